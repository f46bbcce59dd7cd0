"""Every output path is checked before any compute: a one-line error naming the path and the cause.

Read-only places are real read-only tmpfs mounts (this suite runs as root, for whom file modes do not stop a
write); the tests that need one skip where this process may not mount.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aikd.cli import main
from helpers import tmpfs

TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
        "data.test_limit=100", "train.epochs=1", "device=cpu"]
CONFIG = str(Path(__file__).resolve().parents[1] / "configs/fashion_mnist/ce.yaml")
READ_ONLY = "ro,size=64k"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aikd: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def read_only(tmp_path) -> Path:
    """A real read-only filesystem (an empty tmpfs mounted ro)."""
    with tmpfs(tmp_path / "ro", READ_ONLY) as folder:
        yield folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "-q", "-c", CONFIG, "-o", str(out), *TINY]) == 0
    return out / "checkpoints" / "last.safetensors"


def test_train_into_a_read_only_place_stops_before_training(capsys, read_only):
    code, err = run_cli(capsys, "train", "-q", "-c", CONFIG, "-o", str(read_only / "run"), *TINY)
    line = one_line_error(err)
    assert code == 2 and f"'{read_only / 'run'}'" in line and "read-only file system" in line


def test_train_into_a_file_or_with_checkpoints_as_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, err = run_cli(capsys, "train", "-q", "-c", CONFIG, "-o", str(target), *TINY)
    assert code == 2 and f"'{target}' is a file; a folder is needed" in one_line_error(err)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")
    code, err = run_cli(capsys, "train", "-q", "-c", CONFIG, "-o", str(run), *TINY)
    assert code == 2 and f"'{run / 'checkpoints'}' is a file" in one_line_error(err)
    assert not (run / "metrics.jsonl").exists()  # nothing trained


def test_a_read_only_checkpoint_folder_stops_the_run_before_its_first_epoch(capsys, tmp_path):
    run = tmp_path / "run"
    with tmpfs(run / "checkpoints", READ_ONLY):
        code, err = run_cli(capsys, "train", "-q", "-c", CONFIG, "-o", str(run), *TINY)
    line = one_line_error(err)
    assert code == 2 and f"'{run / 'checkpoints'}'" in line and "read-only" in line
    assert not (run / "metrics.jsonl").exists()  # no epoch was trained, so none was lost


def test_eval_output_is_checked_before_the_evaluation(capsys, tmp_path, checkpoint):
    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "-o", str(tmp_path))
    assert code == 2 and f"'{tmp_path}' is a folder; a file name is needed" in one_line_error(err)
    assert capsys.readouterr().out == ""  # no evaluation result was printed: it did not run
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "-o", str(blocker / "eval.json"))
    assert code == 2 and f"'{blocker}' is a file, not a folder" in one_line_error(err)


def test_eval_into_a_read_only_place(capsys, read_only, checkpoint):
    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "-o", str(read_only / "eval.json"))
    assert code == 2 and "read-only file system" in one_line_error(err)


def test_export_output_is_checked_before_loading(capsys, tmp_path, read_only, checkpoint):
    target = tmp_path / "taken"
    target.write_text("")
    code, err = run_cli(capsys, "export", "-k", str(checkpoint), "-o", str(target), "--no-onnx")
    assert code == 2 and f"'{target}' is a file; a folder is needed" in one_line_error(err)
    code, err = run_cli(capsys, "export", "-k", str(checkpoint), "-o", str(read_only / "exp"), "--no-onnx")
    assert code == 2 and "read-only file system" in one_line_error(err)
    assert not list(read_only.iterdir())


def test_report_pipeline_and_sweep_outputs(capsys, tmp_path):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    code, err = run_cli(capsys, "report", str(runs), "-o", str(runs))
    assert code == 2 and "is a folder; a file name is needed" in one_line_error(err)
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(capsys, "report", str(runs), "--plots", str(blocker))
    assert code == 2 and f"'{blocker}' is a file; a folder is needed" in one_line_error(err)
    code, err = run_cli(capsys, "pipeline", "-q", "-c", CONFIG, "-o", str(blocker), *TINY)
    assert code == 2 and f"'{blocker}' is a file; a folder is needed" in one_line_error(err)
    code, err = run_cli(capsys, "sweep", "-q", "-c", CONFIG, "--seeds", "0", "-o", str(blocker), *TINY)
    assert code == 2 and f"'{blocker}' is a file; a folder is needed" in one_line_error(err)


def test_results_are_written_with_the_mode_of_every_other_file(tmp_path, checkpoint):
    import os
    import stat

    from aikd.fileio import atomic_write_bytes

    run = checkpoint.parent.parent
    plain = stat.S_IMODE((run / "metrics.jsonl").stat().st_mode)  # an ordinary open(): 0666 less the umask
    for name in ("summary.json", "checkpoints/last.safetensors", "config.yaml"):
        assert stat.S_IMODE((run / name).stat().st_mode) == plain, name
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "shared.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o640  # the group may read, others not


# ---------------------------------------------------------------------- aikd eval checks what it is given


def test_eval_refuses_a_dataset_with_other_class_names_or_channels(capsys, tmp_path, checkpoint):
    import numpy as np
    from PIL import Image

    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "data.name=fashion-mnist", "data.root=null",
                        "data.train_limit=100", "data.test_limit=50")
    line = one_line_error(err)
    assert code == 2 and "trained on other classes (0, 1, 2, 3, ...)" in line and "T-shirt/top" in line
    root = tmp_path / "ten"
    for split in ("train", "test"):
        for k in range(10):
            (root / split / str(k)).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 25 * k, dtype=np.uint8)).save(root / split / str(k) / "a.png")
    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "data.name=imagefolder", f"data.root={root}",
                        "data.image_size=8", "data.train_limit=null", "data.test_limit=null")
    assert code == 2 and "takes 1-channel images, but this dataset has 3 channels" in one_line_error(err)


def test_eval_refuses_overrides_it_cannot_apply(capsys, checkpoint):
    code, err = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "model.name=resnet18", "train.lr=0.5")
    line = one_line_error(err)
    assert code == 2 and "model.name=resnet18, train.lr=0.5 cannot be applied" in line and "data.*" in line
    code, _ = run_cli(capsys, "eval", "-q", "-k", str(checkpoint), "data.test_limit=50", "device=cpu")
    assert code == 0


def test_a_write_that_fails_during_the_run_is_named_in_one_line(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # the epoch log cannot be opened: a failure met mid-run
    code, err = run_cli(capsys, "train", "-q", "-c", CONFIG, "-o", str(run), *TINY)
    line = one_line_error(err)
    assert code == 2 and f"'{run / 'metrics.jsonl'}'" in line and "is a directory" in line
    assert "--resume" in line  # aikd train continues with --resume
