"""Checkpoints: exact round trips, refusal of damaged or hostile files, atomic writes."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from aikd.engine import checkpoint as ckpt_mod
from aikd.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from aikd.engine.model_io import load_frozen_model, model_meta
from aikd.errors import CheckpointError, DiskFullError
from aikd.models import build_model

CPU = torch.device("cpu")


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _trained_sgd(model: nn.Module) -> torch.optim.SGD:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return opt


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# ---------------------------------------------------------------- round trips

def test_round_trip_of_weights_and_nested_state(tmp_path):
    model = _tiny_model()
    opt = _trained_sgd(model)
    opt_state = opt.state_dict()
    assert all("momentum_buffer" in s for s in opt_state["state"].values())
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "optimizer": opt_state,
        "epoch": 7,
        "pair": (1, "two", None, (3.5, False)),
        "numpy_rng": np_state,
        "python_rng": py_state,
        "nothing": None,
        "flag": True,
        "ratio": 0.1 + 0.2,  # not exactly 0.3: must survive bit for bit
        "name": "ce",
        "history": [1.5, {"a": torch.arange(3)}],
        "buffer": torch.tensor([[1.0, -2.0], [3.0, 4.5]], dtype=torch.float64),
    }
    meta = {"epoch": 7, "config": {"seed": 3}}
    path = save_checkpoint(tmp_path / "ck.safetensors", model.state_dict(), meta, state)
    loaded = load_checkpoint(path)

    # model weights, exact
    expected = model.state_dict()
    assert set(loaded.model) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded.model[k], v)
    assert loaded.meta["epoch"] == 7
    assert loaded.meta["config"] == {"seed": 3}
    assert loaded.path == path

    s = loaded.state
    # optimizer: int keys stay ints, momentum buffers exact
    assert set(s["optimizer"]["state"]) == set(opt_state["state"])
    assert all(isinstance(k, int) for k in s["optimizer"]["state"])
    for k, v in opt_state["state"].items():
        assert torch.equal(s["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
    assert s["optimizer"]["param_groups"] == opt_state["param_groups"]
    # tuples stay tuples (also nested), scalars keep their types
    assert s["pair"] == (1, "two", None, (3.5, False))
    assert isinstance(s["pair"], tuple) and isinstance(s["pair"][3], tuple)
    assert s["epoch"] == 7 and type(s["epoch"]) is int
    assert s["nothing"] is None
    assert s["flag"] is True
    assert s["ratio"] == 0.1 + 0.2
    assert s["name"] == "ce"
    assert s["history"][0] == 1.5
    assert torch.equal(s["history"][1]["a"], torch.arange(3))
    assert s["buffer"].dtype == torch.float64
    assert torch.equal(s["buffer"], state["buffer"])
    # python RNG state compares equal as a whole
    assert s["python_rng"] == py_state
    # numpy RNG state: name, key array (uint32, exact), position, gauss cache
    name, key, pos, has_gauss, cached = s["numpy_rng"]
    assert name == np_state[0]
    assert isinstance(key, np.ndarray)
    assert key.dtype == np_state[1].dtype
    np.testing.assert_array_equal(key, np_state[1])
    assert (pos, has_gauss, cached) == tuple(np_state[2:])


def test_loaded_optimizer_state_continues_identically(tmp_path):
    model = _tiny_model()
    opt = _trained_sgd(model)
    save_checkpoint(tmp_path / "a.safetensors", model.state_dict(), {}, {"optimizer": opt.state_dict()})
    loaded = load_checkpoint(tmp_path / "a.safetensors")

    twin = _tiny_model(seed=1)  # different init, overwritten by the checkpoint
    twin.load_state_dict(loaded.model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1.0)
    twin_opt.load_state_dict(loaded.state["optimizer"])
    assert twin_opt.param_groups[0]["momentum"] == 0.9 and twin_opt.param_groups[0]["nesterov"] is True

    x = torch.randn(6, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_state_restores_every_stream():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    # move every stream on
    random.random()
    np.random.rand(5)
    torch.rand(5)
    set_rng_state(state)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    assert again == first


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "rng.safetensors", {}, {}, {"rng": rng_state()})
    first = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "rng.safetensors").state["rng"])
    again = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert again == first


def test_state_with_unsupported_type_is_refused(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(tmp_path / "x.safetensors", {}, {}, {"bad": object()})


# ---------------------------------------------------------------- damaged and hostile files

@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    model = _tiny_model()
    opt = _trained_sgd(model)
    return save_checkpoint(tmp_path / "good.safetensors", model.state_dict(), {"epoch": 1},
                           {"optimizer": opt.state_dict()})


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01])
def test_truncated_checkpoint_gives_checkpoint_error(good_checkpoint, tmp_path, keep):
    data = good_checkpoint.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(cut)
    assert str(cut) in str(info.value)


def test_random_bytes_give_checkpoint_error(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_empty_and_missing_files_give_checkpoint_error(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a folder


def test_plain_safetensors_without_aikd_metadata_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "aikd" in str(info.value)


@pytest.mark.parametrize("header", [
    "not json {",
    '{"format": "other/9", "state": {}}',
    '{"format": "aikd-checkpoint/1"}',
    '{"format": "aikd-checkpoint/1", "state": {"__tensor__": "state/99"}}',
    '{"format": "aikd-checkpoint/1", "state": {"__what__": 1}}',
    '["a", "list"]',
])
def test_damaged_header_is_refused(tmp_path, header):
    path = tmp_path / "damaged.safetensors"
    save_file({"model/w": torch.ones(2)}, str(path), metadata={"aikd": header})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


class _Exploit:
    """Unpickling this object would create ``sentinel``."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_pickle_disguised_as_safetensors_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    # the payload really is live: a plain unpickle creates the sentinel
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(probe))).close()
    assert probe.exists()

    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps({"model": _Exploit(sentinel)}))
    zipped = tmp_path / "evil_zip.safetensors"
    torch.save({"model": _Exploit(sentinel)}, zipped)  # torch's zip+pickle format
    for path in (raw, zipped):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
    assert not sentinel.exists()


# ---------------------------------------------------------------- atomic writes

def test_successful_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "last.safetensors"  # parent folder is created
    save_checkpoint(target, _tiny_model().state_dict(), {"epoch": 1})
    save_checkpoint(target, _tiny_model(seed=2).state_dict(), {"epoch": 2})  # overwrite
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.safetensors"]
    assert load_checkpoint(target).meta["epoch"] == 2


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    old = _tiny_model(seed=0)
    save_checkpoint(target, old.state_dict(), {"epoch": 1}, {"step": 10})
    before = target.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    new = _tiny_model(seed=5)
    with pytest.raises(DiskFullError, match=r"No space left .* to write 'last\.safetensors': it needs [0-9.]+ MiB"):
        save_checkpoint(target, new.state_dict(), {"epoch": 2}, {"step": 20})
    monkeypatch.undo()

    assert _tmp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    assert target.read_bytes() == before
    loaded = load_checkpoint(target)
    assert loaded.meta["epoch"] == 1
    assert loaded.state == {"step": 10}
    for k, v in old.state_dict().items():
        assert torch.equal(loaded.model[k], v)


class FailingWriter:
    """A file whose write lands ``share`` of the data, then fails with ``errno`` (5: I/O error, 28: ENOSPC)."""

    def __init__(self, fh, errno: int, message: str, share: float = 0.0):
        self.fh, self.errno, self.message, self.share = fh, errno, message, share

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: int(len(data) * self.share)])
        raise OSError(self.errno, self.message)


def fail_writes(monkeypatch, errno: int, message: str, share: float = 0.0) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingWriter(real_fdopen(fd, mode), errno, message, share))


def test_failed_write_mid_payload_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    ckpt_mod.atomic_write_bytes(target, b"old contents")
    fail_writes(monkeypatch, 5, "I/O error", share=0.5)
    with pytest.raises(OSError, match="I/O error"):
        ckpt_mod.atomic_write_bytes(target, b"new contents that never fully land")
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert _tmp_files(tmp_path) == []


# ---------------------------------------------------------------- frozen models

def _saved_small_cnn(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28)
    meta = model_meta("small_cnn", "auto", 10, 1, 28, [str(i) for i in range(10)])
    path = save_checkpoint(tmp_path / "teacher.safetensors", model.state_dict(), meta)
    return path, model


def test_load_frozen_model_rejects_class_count_mismatch(tmp_path):
    path, _ = _saved_small_cnn(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_frozen_model(path, CPU, num_classes=7, in_channels=1)
    msg = str(info.value)
    assert "10 classes" in msg
    assert "has 7" in msg
    assert str(path) in msg


def test_load_frozen_model_rejects_a_model_of_other_data_with_the_same_class_count(tmp_path):
    path, _ = _saved_small_cnn(tmp_path)  # 10 classes named 0..9, 28 px
    with pytest.raises(CheckpointError, match="trained on 28-pixel images, but this run uses 8-pixel"):
        load_frozen_model(path, CPU, num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(CheckpointError, match=r"other classes \(0, 1, 2, 3, \.\.\.\) than this dataset's \(T-shirt"):
        load_frozen_model(path, CPU, num_classes=10, in_channels=1, image_size=28,
                          classes=["T-shirt", *map(str, range(1, 10))])
    assert load_frozen_model(path, CPU, num_classes=10, in_channels=1, image_size=28,
                             classes=[str(i) for i in range(10)]) is not None


def test_load_frozen_model_rejects_channel_and_architecture_mismatch(tmp_path):
    path, _ = _saved_small_cnn(tmp_path)
    with pytest.raises(CheckpointError, match="1-channel"):
        load_frozen_model(path, CPU, num_classes=10, in_channels=3)
    with pytest.raises(CheckpointError, match="preact_resnet18"):
        load_frozen_model(path, CPU, num_classes=10, in_channels=1, expect_model="preact_resnet18")


def test_load_frozen_model_returns_frozen_eval_model(tmp_path):
    path, original = _saved_small_cnn(tmp_path)
    model = load_frozen_model(path, CPU, num_classes=10, in_channels=1, expect_model="small_cnn")
    assert not model.training
    assert all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert params and all(not p.requires_grad for p in params)
    for k, v in original.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    x = torch.randn(2, 1, 28, 28)
    original.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), original(x))
    assert model(x).shape == (2, 10)


def test_weights_that_do_not_fit_the_declared_model_are_refused(tmp_path):
    meta = model_meta("small_cnn", "auto", 10, 1, 28, [str(i) for i in range(10)])
    path = save_checkpoint(tmp_path / "wrong.safetensors", _tiny_model().state_dict(), meta)
    with pytest.raises(CheckpointError, match="small_cnn"):
        load_frozen_model(path, CPU, num_classes=10, in_channels=1)


# ---------------------------------------------------------------- a full disk

TINY_RUN = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
            "data.test_limit=64", "device=cpu"]


def test_full_disk_at_a_checkpoint_names_the_file_and_keeps_the_last_one(tmp_path, monkeypatch, one_thread):
    from aikd.config import load_config
    from aikd.engine import Trainer

    cfg = load_config(None, [*TINY_RUN, "train.epochs=2"])
    Trainer(cfg, tmp_path, quiet=True).fit(stop_after=1)
    before = (tmp_path / "checkpoints/last.safetensors").read_bytes()
    fail_writes(monkeypatch, 28, "No space left on device")  # the write a full filesystem gives: ENOSPC
    with pytest.raises(DiskFullError) as info:
        Trainer(cfg, tmp_path, quiet=True).fit(resume=True)
    monkeypatch.undo()
    message = str(info.value)
    assert re.search(r"to write '(best|last)\.safetensors': it needs [0-9.]+ MiB \([0-9,.]+ MiB free\)", message)
    assert f"The last checkpoint '{tmp_path / 'checkpoints/last.safetensors'}' is intact" in message
    assert "--resume" in message
    assert (tmp_path / "checkpoints/last.safetensors").read_bytes() == before  # untouched, loadable
    assert load_checkpoint(tmp_path / "checkpoints/last.safetensors").meta["epoch"] == 1
    assert _tmp_files(tmp_path / "checkpoints") == []


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 1.5 MiB tmpfs (skipped where this process may not mount one)."""
    from helpers import tmpfs

    with tmpfs(tmp_path / "tiny", "size=1536k") as folder:
        yield folder


def test_a_really_full_filesystem_stops_the_run_with_a_clear_message(tiny_filesystem):
    import subprocess
    import sys

    # A small_cnn checkpoint of digits is about 0.7 MiB: the first fits, the second (written next to it
    # before the atomic rename) does not.
    out = tiny_filesystem / "run"
    done = subprocess.run([sys.executable, "-m", "aikd", "train", "-q", "-c", "configs/fashion_mnist/ce.yaml",
                           "-o", str(out), *TINY_RUN, "train.epochs=3"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "No space left" in done.stderr and "--resume" in done.stderr
    assert load_checkpoint(out / "checkpoints/last.safetensors").meta["epoch"] >= 1
