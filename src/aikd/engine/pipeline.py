"""Two-phase training: a superior (teacher) model with CE, then the student against it.

Phase 1 trains the superior model with plain CE and the student's own recipe
(AI-KD Section 3, TF-KD's self-teacher). Its run lands in a cache folder keyed
by everything that shapes it (model, data, recipe, seed), so a sweep over
methods or ablations that share it trains it once. ``teacher.checkpoint=PATH``
skips phase 1 and uses the given model.

Overrides apply to both phases; ``phase1.KEY=VALUE`` or ``phase2.KEY=VALUE``
applies to one only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aikd.config import (
    ModelConfig,
    RunConfig,
    TeacherConfig,
    apply_overrides,
    from_dict,
    normalized,
    read_yaml,
    recipe_name,
    with_teacher_hash,
)
from aikd.distributed import current, is_main_rank
from aikd.engine.locks import cache_entry_lock
from aikd.engine.output import Output
from aikd.engine.state import config_diff
from aikd.engine.trainer import LAST, train
from aikd.errors import AikdError, ConfigError, DiskFullError, RunInterrupted, for_rerun
from aikd.fileio import atomic_write_bytes, check_output_folder
from aikd.methods import METHODS
from aikd.registry import METHOD_CONFIGS
from aikd.run_files import read_saved_config, read_summary

PHASES = ("phase1", "phase2")
PHASE1_METHOD = "ce"  # phase 1 trains with plain cross-entropy
PHASE1_RECIPE = "ce"  # the recipe a phase-1 model is labelled with: the Baseline row of every report


def split_phase_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate ``phase1.``/``phase2.`` prefixed overrides from the common ones."""
    common: list[str] = []
    per_phase: dict[str, list[str]] = {p: [] for p in PHASES}
    for text in overrides:
        head, _, rest = text.partition(".")
        if head in PHASES and "=" in rest:
            per_phase[head].append(rest)
        else:
            common.append(text)
    return common, per_phase


def _read_phases(config: str | Path, overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The config file with the common overrides applied, and each phase's own overrides."""
    common, per_phase = split_phase_overrides(overrides)
    return apply_overrides(read_yaml(config), common), per_phase


def _phase_config(base: dict[str, Any], per_phase: dict[str, list[str]], phase: str, source: str) -> RunConfig:
    """One phase's config, validated: ``base`` with that phase's overrides."""
    return from_dict(apply_overrides(base, per_phase[phase]), source=source)


def student_config(config: str | Path, overrides: Sequence[str], source: str | None = None) -> RunConfig:
    """The student's (phase 2's) config from the config file and the overrides, validated; ``source`` names it in
    a refusal (default: the file)."""
    base, per_phase = _read_phases(config, overrides)
    return _phase_config(base, per_phase, "phase2", source or str(config))


def superior_config(student: RunConfig, teacher_model: str | None = None) -> RunConfig:
    """Phase 1's config, derived from the student's: its data and recipe with plain CE and no teacher.

    The model is the student's, or ``teacher_model`` (``teacher.model``) for teacher-student KD.
    """
    model = student.model if teacher_model is None else ModelConfig(name=teacher_model)
    return dataclasses.replace(copy.deepcopy(student), method=PHASE1_METHOD, teacher=TeacherConfig(), model=model,
                               hparams=METHOD_CONFIGS.get(PHASE1_METHOD)())


SHAPING = ("seed", "deterministic", "data", "model", "train")  # what determines a phase-1 model


def superior_key(cfg: RunConfig) -> str:
    """A short hash of everything that determines the phase-1 model.

    Only settings that differ from their defaults enter the hash, so a config key added in a later
    version (at its default) leaves every existing cache entry's name as it was.
    """
    defaults = RunConfig().to_dict()
    shaping = {k: _not_default(v, defaults[k]) for k, v in cfg.to_dict().items() if k in SHAPING}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.model.name}-{cfg.data.name}-seed{cfg.seed}-{digest}"


def _not_default(value: Any, default: Any) -> Any:
    if isinstance(value, dict) and isinstance(default, dict):
        return {k: _not_default(v, default.get(k)) for k, v in value.items() if v != default.get(k)}
    return value


def cached_superior(cache: Path, cfg: RunConfig) -> Path:
    """The cache entry of ``cfg``'s phase-1 model."""
    return cache / superior_key(cfg)


def _finished(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` made with exactly ``cfg``, else None."""
    summary, saved = run_dir / "summary.json", run_dir / "config.yaml"
    if summary.is_file() and saved.is_file() and _same_config(read_saved_config(saved), cfg):
        return read_summary(summary)
    return None


def _same_config(saved: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a run folder's saved config is ``cfg``: the teacher by its weights, wherever it lies now."""
    saved = normalized(saved)
    return saved is not None and not config_diff(saved, with_teacher_hash(cfg).to_dict())


def train_or_reuse(cfg: RunConfig, run_dir: Path, output: Output, overwrite: bool = False,
                   recipe: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir``, reuse a finished identical run, or resume an unfinished one.

    A run made with another config is replaced only with ``overwrite``; otherwise
    the call stops with a message (a finished run is never lost silently).
    """
    try:
        return _train_or_reuse(cfg, run_dir, output, overwrite, recipe)
    except (RunInterrupted, DiskFullError) as err:  # a pipeline continues its runs when run again: say so
        raise for_rerun(err) from None


def _finished_with_another_config(run_dir: Path) -> AikdError:
    """The refusal to replace a finished run of another config without ``overwrite``."""
    return AikdError(f"'{run_dir}' holds a finished run made with another config. Choose another output "
                     f"folder, or pass --overwrite to replace it.")


def _refuse_a_student_of_another_config(student: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Before phase 1 trains anything: a student run (finished, or started) of another config is kept unless
    ``overwrite``, and the message names the keys that differ and the options that work."""
    saved = student / "config.yaml"
    started = (student / "summary.json").is_file() or (student / "checkpoints" / LAST).is_file()
    if overwrite or student.is_symlink() or not started or not saved.is_file():
        return
    differ = [key.split(" (")[0] for key in config_diff(normalized(read_saved_config(saved)) or {},
                                                         with_teacher_hash(cfg).to_dict())]
    if not differ:
        return
    if (student / "summary.json").is_file():
        raise _finished_with_another_config(student)
    raise AikdError(f"'{student}' holds an unfinished run made with another config (it differs in "
                    f"{', '.join(differ)}). Continue it with the command that started it, choose another output "
                    f"folder, or pass --overwrite to replace it.")


def _train_or_reuse(cfg: RunConfig, run_dir: Path, output: Output, overwrite: bool, recipe: str | None
                    ) -> dict[str, Any]:
    done = _finished(run_dir, cfg)
    if done is not None:
        output.log(f"aikd: reusing the finished run in {run_dir}")
        return done
    finished = (run_dir / "summary.json").is_file()
    started = finished or (run_dir / "checkpoints" / LAST).is_file()
    if not started or overwrite:
        return train(cfg, run_dir, overwrite=overwrite, output=output, recipe=recipe)
    if finished:
        raise _finished_with_another_config(run_dir)
    output.log(f"aikd: resuming the unfinished run in {run_dir}")
    # train() refuses, naming the differing keys, if cfg changed since the checkpoint.
    return train(cfg, run_dir, resume="auto", output=output, recipe=recipe)


def _as_phase1_model(cfg: RunConfig, recipe: str, out: Path, cache_dir: str | Path | None) -> Path | None:
    """The cache entry that ``cfg`` would train, if this run is a phase-1 model: the Baseline (recipe ``ce``) of
    a config and seed whose phase-1 model other pipelines share. None otherwise.

    Only with a shared cache (``aikd sweep``, or ``--cache``), and only where no student folder of an earlier
    layout holds the run already, so a sweep's CE row and the superior model of the same seed are one run.
    """
    student = out / "student"
    if cache_dir is None or recipe != PHASE1_RECIPE or (student.exists() and not student.is_symlink()):
        return None
    return cached_superior(Path(cache_dir), cfg) if superior_config(cfg) == cfg else None


def _train_phase1_model(entry: Path, cfg: RunConfig, student: Path, output: Output) -> dict[str, Any]:
    """Train (or reuse) the Baseline in its phase-1 cache entry; ``student`` becomes a link to it."""
    output.log(f"aikd: the Baseline is this seed's phase-1 model -> {entry}")
    with cache_entry_lock(entry, output.log) if is_main_rank() else contextlib.nullcontext():
        summary = train_or_reuse(cfg, entry, output, recipe=PHASE1_RECIPE)
    if current().is_main and not student.exists():
        student.parent.mkdir(parents=True, exist_ok=True)
        student.symlink_to(os.path.relpath(entry.resolve(), student.parent.resolve()), target_is_directory=True)
    return {**summary, "run_dir": str(entry)}


@dataclass
class PipelinePlan:
    """What a pipeline will train, worked out before anything trains (a Slurm sweep plans its jobs from it)."""

    student: RunConfig  # phase 2's config; its teacher.checkpoint points into superior_dir when there is a phase 1
    recipe: str  # the student's label in reports
    superior: RunConfig | None = None  # phase 1's config, None without a phase 1
    superior_dir: Path | None = None  # phase 1's cache entry
    shared_entry: Path | None = None  # this run is itself a phase-1 model (the Baseline), trained in this entry

    @property
    def phase1_entry(self) -> Path | None:
        """The cache entry this run needs (phase 1) or is (the Baseline), if any."""
        return self.superior_dir or self.shared_entry


def plan_pipeline(config: str | Path, overrides: Sequence[str], out_dir: str | Path, *,
                  cache_dir: str | Path | None = None, variant: str | None = None) -> PipelinePlan:
    """The student's config, its phase-1 model's config and cache entry, from the config file and overrides."""
    out = Path(out_dir)
    base, per_phase = _read_phases(config, overrides)
    student_cfg = _phase_config(base, per_phase, "phase2", str(config))
    method_cls = METHODS.get(student_cfg.method)
    teacher_model = student_cfg.teacher.model
    if method_cls.teacher_same_architecture and teacher_model not in (None, student_cfg.model.name):
        raise ConfigError(
            f"Method '{student_cfg.method}' distils from a copy of the student's own architecture "
            f"('{student_cfg.model.name}'), but teacher.model is '{teacher_model}'. Remove teacher.model."
        )
    recipe = recipe_name(config, student_cfg.model.name, student_cfg.method)
    plan = PipelinePlan(student_cfg, f"{recipe}[{variant}]" if variant else recipe)
    if method_cls.needs_teacher(student_cfg.hparams) and student_cfg.teacher.checkpoint is None:
        # The common settings with the phase-1 overrides, before any phase-2 override: the model other methods share.
        phase1 = student_cfg if not (per_phase["phase1"] or per_phase["phase2"]) else \
            _phase_config(base, per_phase, "phase1", f"{config} (phase 1)")
        plan.superior = superior_config(phase1, teacher_model)
        plan.superior_dir = cached_superior(Path(cache_dir or out / "superior"), plan.superior)
        student_cfg.teacher.checkpoint = str(plan.superior_dir / "checkpoints" / LAST)
    elif per_phase["phase1"]:
        raise ConfigError(f"phase1.* overrides were given, but method '{student_cfg.method}' with these settings "
                          f"has no phase 1 (it needs no pre-trained model, or teacher.checkpoint is set).")
    plan.shared_entry = _as_phase1_model(student_cfg, plan.recipe, out, cache_dir)
    return plan


def phase1_finished(plan: PipelinePlan) -> bool:
    """Whether the phase-1 model this plan needs (or is) has finished training in its cache entry."""
    entry = plan.phase1_entry
    return entry is not None and _finished(entry, plan.superior or plan.student) is not None


def student_finished(plan: PipelinePlan, out_dir: str | Path) -> bool:
    """Whether the run itself (the student, or the Baseline in its cache entry) has finished."""
    if plan.shared_entry is not None:
        return phase1_finished(plan)
    return _finished(Path(out_dir) / "student", plan.student) is not None


def run_pipeline(config: str | Path, overrides: Sequence[str], out_dir: str | Path, *,
                 cache_dir: str | Path | None = None, output: Output | None = None, quiet: bool | None = None,
                 log: Callable[[str], None] | None = None, overwrite: bool = False, variant: str | None = None,
                 phase1_only: bool = False) -> dict[str, Any]:
    """Run phase 1 (when the method needs it) and phase 2; return both summaries.

    ``output`` says where the runs' words go; ``quiet`` and ``log`` replace its settings of the same names.

    ``overwrite`` replaces a student run in ``out_dir`` made with another config.
    ``variant`` tags the student's recipe (``aikd[aikd.alpha_p=0.1]``): a sweep's grid point.
    ``phase1_only`` stops after phase 1 (a Slurm sweep trains each phase-1 model as a job of its own).
    """
    output = (output or Output()).with_(quiet=quiet, log=log)
    out = Path(out_dir)
    check_output_folder(out, "pipeline folder")
    if cache_dir is not None:
        check_output_folder(cache_dir, "phase-1 cache folder")
    plan = plan_pipeline(config, overrides, out, cache_dir=cache_dir, variant=variant)
    result: dict[str, Any] = {"config": str(config), "superior": None}
    if plan.shared_entry is None:
        _refuse_a_student_of_another_config(out / "student", plan.student, overwrite)
    if plan.superior is not None:
        output.log(f"aikd: phase 1, superior model -> {plan.superior_dir}")
        # Two pipelines that need this model (a sweep with --jobs) train it once: the second waits, then reuses it.
        # Under torchrun only rank 0 takes the lock; the other ranks follow it through the run's collectives.
        with cache_entry_lock(plan.superior_dir, output.log) if is_main_rank() else contextlib.nullcontext():
            result["superior"] = train_or_reuse(plan.superior, plan.superior_dir, output, recipe=PHASE1_RECIPE)
        result["superior"]["run_dir"] = str(plan.superior_dir)
    if phase1_only and plan.shared_entry is None:
        return result
    if plan.shared_entry is not None:
        result["student"] = _train_phase1_model(plan.shared_entry, plan.student, out / "student", output)
    else:
        output.log(f"aikd: phase 2, {plan.student.method} student -> {out / 'student'}")
        result["student"] = train_or_reuse(plan.student, out / "student", output, overwrite, plan.recipe)
        result["student"]["run_dir"] = str(out / "student")
    if current().is_main:  # under torchrun every rank runs the pipeline; rank 0 writes its files
        atomic_write_bytes(out / "pipeline.json", json.dumps(result, indent=2).encode())
    return result
