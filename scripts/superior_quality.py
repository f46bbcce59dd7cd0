"""How good, and how confident, AI-KD's superior model is, next to the student it guides.

L_G and the critic can only pass on what the superior model knows beyond the labels. A model that
has memorised its training images answers them nearly one-hot, and then L_G is close to CE. For
every run folder given (each holding seed<k>/student/checkpoints/last.safetensors, or runs below
it), this loads the student and its superior model at the end of training: the pre-trained model
named in the run's config (two-phase AI-KD) or the in-run copy saved in the checkpoint (EMA,
milestone). It prints, as the mean over the runs found, each model's error on the training images
(un-augmented) and on the evaluation split, and its mean top probability on the training images at
T = 1 and at the guide temperature T_G (what L_G matches).

    PYTHONPATH=src python scripts/superior_quality.py runs/fmnist_proxy/fmnist_proxy/aikd*
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path

import torch

from aikd.engine.checkpoint import load_checkpoint
from aikd.evaluation import LoadedModel, load_model
from aikd.metrics import topk_error

PREFIX = "superior.model."  # the in-run superior model (aikd.methods.superior) in the method's state


def _quality(loaded: LoadedModel, temp_g: float) -> dict[str, float]:
    """Error on the training images and on the evaluation split; mean top probability on the training images."""
    train_logits, train_labels = loaded.predict(split=loaded.data.train)
    eval_logits, eval_labels = loaded.predict()
    return {"train err %": topk_error(train_logits, train_labels, 1),
            "eval err %": topk_error(eval_logits, eval_labels, 1),
            "top p (T=1)": train_logits.softmax(-1).amax(-1).mean().item(),
            "top p (T_G)": (train_logits / temp_g).softmax(-1).amax(-1).mean().item()}


def _superior(student_checkpoint: Path, student: LoadedModel) -> LoadedModel:
    """The run's superior model: the pre-trained checkpoint in its config, or the copy in its checkpoint."""
    if student.cfg.hparams.superior == "pretrained":
        return load_model(student.cfg.teacher.checkpoint)
    method_state = load_checkpoint(student_checkpoint).state["method"]
    weights = {k.removeprefix(PREFIX): v for k, v in method_state.items() if k.startswith(PREFIX)}
    superior = copy.deepcopy(student.model)  # the student's architecture, the copy's weights
    superior.load_state_dict(weights)
    return dataclasses.replace(student, model=superior)


def finished_runs(folder: Path) -> list[Path]:
    """The last checkpoint of every finished run (one with a summary.json) under ``folder``."""
    return [c for c in sorted(folder.rglob("student/checkpoints/last.safetensors"))
            if (c.parent.parent / "summary.json").is_file()]


def summarize(folder: Path) -> dict[str, dict[str, float]]:
    """Mean quality of the students and of their superior models over the runs under ``folder``."""
    rows: dict[str, list[dict[str, float]]] = {"student": [], "superior": []}
    for checkpoint in finished_runs(folder):
        student = load_model(checkpoint)
        temp_g = student.cfg.hparams.temp_g
        with torch.no_grad():
            rows["student"].append(_quality(student, temp_g))
            rows["superior"].append(_quality(_superior(checkpoint, student), temp_g))
    return {who: {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
            for who, runs in rows.items() if runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    header = None
    for folder in args.folders:
        result = summarize(folder)
        count = len(finished_runs(folder))
        for who, values in result.items():
            if header is None:
                header = list(values)
                print("| runs | model | n | " + " | ".join(header) + " |")
                print("|---|---|---:|" + "---:|" * len(header))
            print(f"| {folder.name} | {who} | {count} | " + " | ".join(f"{values[k]:.2f}" for k in header) + " |")


if __name__ == "__main__":
    main()
