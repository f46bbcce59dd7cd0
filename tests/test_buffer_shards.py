"""The per-sample prediction buffer sharded over a run's ranks, and its checkpoints.

The 2-rank runs are real torchrun jobs on gloo whose entry point is this file. A sharded buffer is checked
bit for bit against a single-process buffer written with the same global batches (stored -0.0, +0.0 and the
NaN "not seen" rows included); each rank's block against the rows it must own; the checkpoint streamed from
both ranks' blocks against the whole buffer, read by safetensors' own reader; and a run resumed with another
number of processes against the rows the file holds.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import SafetensorsStream, abandon_checkpoint, load_checkpoint, save_checkpoint
from aikd.engine.state import find_resume_checkpoint
from aikd.errors import CheckpointError
from aikd.methods.buffer import PredictionBuffer
from aikd.shards import RowBlocks

NUM, CLASSES, STEP_ROWS = 23, 5, 4  # 23 rows over 2 ranks: blocks of 11 and 12
TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=205",
        "data.test_limit=64", "deterministic=true", "device=cpu", "train.epochs=2", "method=pskd"]
BUFFER_KEY = "buffer.logits"


def torchrun(*jobs: str) -> subprocess.CompletedProcess:
    """This file as the entry point of a 2-rank gloo job running ``jobs`` ("exchange:OUT", "stop1:OUT",
    "resume:OUT") in turn."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, *jobs]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float16 tensor's bit patterns: equal only where the values are identical, -0.0 and NaN included."""
    return tensor.contiguous().view(torch.int16)


# ----------------------------------------------------------------------------- in one process


def test_row_blocks_give_every_row_to_exactly_one_rank_in_order():
    for rows in (0, 1, 7, 23, 1_281_167):
        for ranks in (1, 2, 3, 8):
            blocks = RowBlocks(rows, ranks)
            bounds = [blocks.bounds(r) for r in range(ranks)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous, in rank order
            assert max(blocks.sizes()) - min(blocks.sizes()) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        RowBlocks(5, 2).bounds(2)


def test_a_buffer_sharded_without_step_rows_is_refused():
    class TwoRanks:
        rank, world_size, is_main, distributed = 0, 2, True, True

    with pytest.raises(ValueError, match="step_rows"):
        PredictionBuffer(10, 3, strategy=TwoRanks(), shard=True)


def test_the_streamed_file_is_byte_for_byte_the_one_safetensors_writes():
    dtypes = (torch.float16, torch.float32, torch.int64, torch.bool, torch.bfloat16, torch.uint8, torch.float64,
              torch.int32, torch.int8, torch.int16)
    tensors = {f"t{i}": (torch.arange(12).reshape(3, 4) - 5).to(dtype) for i, dtype in enumerate(dtypes)}
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "view": torch.arange(10.0)[2:8:2]}
    metadata = {"aikd": json.dumps({"note": "é\n"})}
    stream = SafetensorsStream(tensors, metadata)
    written = io.BytesIO()
    stream.write(written)
    assert written.getvalue() == save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    assert stream.size == len(written.getvalue())


def test_a_checkpoint_file_is_read_by_safetensors_own_reader(tmp_path):
    buffer = PredictionBuffer(NUM, CLASSES)
    buffer.write(torch.tensor([3, 0, 22]), torch.randn(3, CLASSES))
    path = save_checkpoint(tmp_path / "ck.safetensors", {"w": torch.ones(2)}, {"epoch": 1},
                           {"buffer": buffer.row_shards()["logits"], "other": torch.arange(4)})
    plain = load_file(path)
    assert torch.equal(bits(plain["state/1"]), bits(buffer.logits))  # numbered after the model tensor
    assert torch.equal(plain["model/w"], torch.ones(2))
    assert torch.equal(bits(load_checkpoint(path).state["buffer"]), bits(buffer.logits))
    lazy = load_checkpoint(path, lazy_rows=True).state["buffer"]
    assert lazy.shape == (NUM, CLASSES) and torch.equal(bits(lazy.rows(3, 4)), bits(buffer.logits[3:4]))


def test_resume_auto_refuses_a_truncated_file_from_its_header_alone(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder / "epoch-0001.safetensors", {"w": torch.ones(1000)}, {"step": 5},
                            {"optimizer": {"x": torch.ones(3)}})
    last = save_checkpoint(tmp_path / "newer.safetensors", {"w": torch.ones(1000)}, {"step": 9},
                           {"optimizer": {"x": torch.ones(3)}})
    (folder / "last.safetensors").write_bytes(last.read_bytes()[:-10])  # a newer step, cut short by a crash

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("--resume auto read a checkpoint's tensors")

    monkeypatch.setattr("aikd.engine.checkpoint.safe_open", no_tensor_reads)
    monkeypatch.setattr("aikd.engine.state.load_checkpoint", no_tensor_reads)
    assert find_resume_checkpoint(tmp_path, "auto") == folder / "epoch-0001.safetensors"
    (folder / "epoch-0001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="tensors end at byte"):
        find_resume_checkpoint(tmp_path, "auto")


# ----------------------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def exchange(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exchange")
    torchrun(f"exchange:{out}")
    return out


def test_two_ranks_read_exactly_what_one_process_reads(exchange):
    for rank in (0, 1):
        result = json.loads((exchange / f"rank{rank}.json").read_text())
        assert result["reads"] > 0 and result["reads_exact"] == result["reads"], result
        assert result["zeros"] > 0 and result["unseen"] > 0  # the run stored -0.0 and left rows NaN


def test_each_rank_holds_the_rows_it_owns_and_no_other(exchange):
    whole = load_file(exchange / "whole.safetensors")["logits"]
    for rank, (start, stop) in enumerate([(0, 11), (11, 23)]):
        block = load_file(exchange / f"block{rank}.safetensors")["logits"]
        assert block.shape == (stop - start, CLASSES)
        assert torch.equal(bits(block), bits(whole[start:stop]))


def test_a_checkpoint_abandoned_by_rank_0_releases_the_ranks_that_send_blocks(exchange):
    """The exchange job ends (a rank left waiting to send would hold it until the subprocess times out) and
    nothing was written."""
    assert not (exchange / "abandoned.safetensors").exists()
    assert (exchange / "rank1.json").is_file()


def test_the_checkpoint_streamed_from_both_ranks_holds_the_whole_buffer_in_order(exchange):
    whole = load_file(exchange / "whole.safetensors")["logits"]
    streamed = load_file(exchange / "sharded.safetensors")  # safetensors' own reader
    assert torch.equal(bits(streamed["state/0"]), bits(whole))
    assert torch.equal(bits(load_checkpoint(exchange / "sharded.safetensors").state["buffer"]), bits(whole))


@pytest.mark.slow
def test_a_run_resumes_with_another_number_of_processes(tmp_path, one_thread):
    """A 1-process checkpoint resumed by 2 ranks, and a 2-rank one by 1 process: each holds the file's rows."""
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(load_config(None, TINY), one, quiet=True).fit(stop_after=1)
    shutil.copytree(one, tmp_path / "one-resumed")
    torchrun(f"stop1:{two}", f"resume:{tmp_path / 'one-resumed'}")
    saved = load_checkpoint(one / "checkpoints" / "last.safetensors").state["method"][BUFFER_KEY]
    assert bool(saved.isfinite().any())
    for rank, (start, stop) in enumerate(RowBlocks(205, 2).bounds(r) for r in range(2)):
        block = load_file(tmp_path / "one-resumed" / f"resumed-block{rank}.safetensors")["logits"]
        assert torch.equal(bits(block), bits(saved[start:stop]))
    written = load_checkpoint(two / "checkpoints" / "last.safetensors").state["method"][BUFFER_KEY]
    assert written.shape == (205, 10) and bool(written.isfinite().all())  # both ranks' blocks, every row seen
    trainer = Trainer(load_config(None, TINY), two, quiet=True)
    trainer.resume()
    assert torch.equal(bits(trainer.method.buffer.logits), bits(written))
    assert trainer.fit(resume=True)["epochs"] == 2


# ----------------------------------------------------------------------------- the torchrun entry point


def _exchange(out: Path) -> None:
    """One rank: a sharded buffer and a whole one (a single process's) through the same global batches."""
    import torch.distributed as dist

    from aikd.distributed import DataParallel, current

    dist.init_process_group("gloo")
    strategy = DataParallel(current())
    rank = strategy.rank
    sharded = PredictionBuffer(NUM, CLASSES, strategy=strategy, step_rows=STEP_ROWS, shard=True)
    whole = PredictionBuffer(NUM, CLASSES)
    generator = torch.Generator().manual_seed(0)
    reads = exact = zeros = 0
    for step in range(9):
        size = 7 if step % 3 == 2 else 8  # 4 + 3: a rank with fewer rows than step_rows
        batch = torch.randperm(NUM - 3, generator=generator)[:size]  # rows 20 to 22 are never written
        logits = torch.randn(size, CLASSES, generator=generator) * 3
        logits[logits.abs() < 0.4] = -0.0
        mine = slice(0, 4) if rank == 0 else slice(4, size)
        got, got_seen = sharded.read(batch[mine])
        want, want_seen = whole.read(batch[mine])
        reads += 1
        exact += int(torch.equal(got.half().view(torch.int16), want.half().view(torch.int16))
                     and torch.equal(got_seen, want_seen))
        sharded.write(batch[mine], logits[mine])
        whole.write(batch, logits)
        zeros += int((torch.signbit(want) & (want == 0)).sum())
    unseen = int((~whole.filled).sum())
    (out / f"rank{rank}.json").write_text(json.dumps({"reads": reads, "reads_exact": exact, "zeros": zeros,
                                                      "unseen": unseen}))
    save_file({"logits": sharded.logits.contiguous()}, str(out / f"block{rank}.safetensors"))
    if rank == 0:
        save_file({"logits": whole.logits.contiguous()}, str(out / "whole.safetensors"))
    save_checkpoint(out / "sharded.safetensors", {}, {}, {"buffer": sharded.row_shards()["logits"]},
                    writer=rank == 0)
    # Rank 0 gives up before writing (train.keep_last's copy of the old file failed): rank 1's blocks are
    # still taken, so it does not wait forever to send them and both reach the barrier.
    state = {"buffer": sharded.row_shards()["logits"]}
    if rank == 0:
        abandon_checkpoint(state)
    else:
        save_checkpoint(out / "abandoned.safetensors", {}, {}, state, writer=False)
    dist.barrier()
    dist.destroy_process_group()


def _resume(out: Path) -> None:
    """One rank resumes a run folder and saves the buffer rows it holds."""
    trainer = Trainer(load_config(None, TINY), out, quiet=True)
    trainer.resume()
    rank = trainer.parts.strategy.rank
    save_file({"logits": trainer.method.buffer.logits.contiguous()}, str(out / f"resumed-block{rank}.safetensors"))
    trainer.parts.strategy.barrier()


if __name__ == "__main__":
    from aikd.rendezvous import leave_group

    warnings.simplefilter("ignore", UserWarning)
    for job in sys.argv[1:]:
        mode, folder = job.split(":", 1)
        if mode == "exchange":
            _exchange(Path(folder))
        elif mode == "stop1":
            Trainer(load_config(None, TINY), folder, quiet=True).fit(stop_after=1)
        elif mode == "resume":
            _resume(Path(folder))
    leave_group(together=True)
