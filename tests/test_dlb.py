"""DLB (src/aikd/methods/dlb.py): the loss against NumPy, its gradients, the sampler's layout (one process and
per rank), exact resume (state_dict, and a real run stopped mid-epoch), the refusals, and the drop-in loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aikd.config import load_config
from aikd.data.loaders import ShardedBatchSampler
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.errors import ConfigError, RunInterrupted
from aikd.methods import Batch, MethodContext
from aikd.methods.dlb import DLB, DLBConfig, DLBLoss, LastBatchSampler, LastLogits, dlb_loss
from helpers import check_loss_records, same_state

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=200",
          "data.test_limit=64", "deterministic=true", "device=cpu", "train.epochs=2", "method=dlb"]


# ----------------------------------------------------------------------------------------------- the loss


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _reference(new, y_new, shared, y_shared, last, found, alpha, t):
    """The official dlb.py:83-95 written out in NumPy (float64), with the rows without a target left out."""
    rows = np.concatenate([shared, new])
    labels = np.concatenate([y_shared, y_new])
    ce = -np.mean(_log_softmax(rows)[np.arange(len(rows)), labels])
    p_t = np.exp(_log_softmax(last / t))
    kl_rows = (p_t * (np.log(p_t) - _log_softmax(shared / t))).sum(axis=1)
    kl = alpha * t * t * (kl_rows * found).sum() / max(found.sum(), 1)
    return ce, kl


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    new, shared, last = (torch.randn(4, 5, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    return new, torch.tensor([0, 1, 2, 3]), shared, torch.tensor([4, 0, 1, 2]), last


@pytest.mark.parametrize(("alpha", "t"), [(1.0, 3.0), (0.7, 2.0)])
def test_loss_matches_the_official_formula_in_numpy(logits, alpha, t):
    new, y_new, shared, y_shared, last = logits
    found = torch.tensor([True, True, False, True])
    ce, kl = dlb_loss(new, y_new, shared, y_shared, last, found, alpha, t)
    ref_ce, ref_kl = _reference(new.numpy(), y_new.numpy(), shared.numpy(), y_shared.numpy(), last.numpy(),
                                found.numpy().astype(float), alpha, t)
    assert ce.item() == pytest.approx(ref_ce, rel=1e-12)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-12)
    assert kl.item() > 0.05  # these logits make a T^2 or a flipped sign show


def test_gradients_reach_both_halves_and_never_the_stored_logits(logits):
    """d/dz_shared of the KL term is alpha T (p(z_shared; T) - p(z_last; T)) / |S|, the CE's (p - y) / rows;
    the stored logits get none (the official ``pre_out.detach()``)."""
    new, y_new, shared, y_shared, last = (x.clone().requires_grad_(x.is_floating_point()) for x in logits)
    alpha, t, found = 0.7, 3.0, torch.ones(4, dtype=torch.bool)
    ce, kl = dlb_loss(new, y_new, shared, y_shared, last, found, alpha, t)
    (ce + kl).backward()
    assert last.grad is None
    p = lambda z, temp=1.0: np.exp(_log_softmax(z.detach().numpy() / temp))  # noqa: E731
    onehot = np.eye(5)
    expected_new = (p(new) - onehot[y_new.numpy()]) / 8
    expected_shared = (p(shared) - onehot[y_shared.numpy()]) / 8 + alpha * t * (p(shared, t) - p(last, t)) / 4
    np.testing.assert_allclose(new.grad.numpy(), expected_new, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(shared.grad.numpy(), expected_shared, rtol=1e-10, atol=1e-12)


def test_rows_without_a_stored_prediction_add_nothing_even_if_it_is_not_finite(logits):
    new, y_new, shared, y_shared, last = logits
    shared = shared.clone().requires_grad_()
    last = last.clone()
    last[1] = float("nan")
    found = torch.tensor([True, False, True, True])
    _, kl = dlb_loss(new, y_new, shared, y_shared, last, found)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(shared.grad).all() and torch.equal(shared.grad[1], torch.zeros(5))
    nothing = dlb_loss(new, y_new, shared, y_shared, last, torch.zeros(4, dtype=torch.bool))[1]
    assert nothing.item() == 0.0


def test_mixed_soft_targets_give_the_soft_cross_entropy(logits):
    new, _, shared, _, last = logits
    soft = torch.softmax(torch.randn(8, 5, dtype=torch.float64), 1)
    ce, _ = dlb_loss(new, soft[:4], shared, soft[4:], last, torch.ones(4, dtype=torch.bool))
    rows = np.concatenate([shared.numpy(), new.numpy()])
    targets = np.concatenate([soft[4:].numpy(), soft[:4].numpy()])
    assert ce.item() == pytest.approx(-(targets * _log_softmax(rows)).sum(1).mean(), rel=1e-12)


# -------------------------------------------------------------------------------------------- the sampler


def _epochs(sampler, epochs):
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_pad_layout_every_sample_new_once_the_last_chunk_padded_and_the_epoch_boundary_carried():
    n, b = 10, 4  # 10 = 2 x 4 + 2: the last chunk is padded with the epoch's first 2 samples
    sampler = LastBatchSampler(n, b, seed=5)
    assert len(sampler) == 3 and sampler.num_samples == 12
    epochs = _epochs(sampler, range(3))
    for epoch, batches in enumerate(epochs):
        assert all(len(batch) == 2 * b for batch in batches)
        new = [batch[:b] for batch in batches]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003 + epoch)).tolist()
        assert [i for chunk in new for i in chunk] == order + order[:2]  # each sample new once, then the 2 pads
        for i, batch in enumerate(batches):
            if i > 0:
                assert batch[b:] == new[i - 1]  # the shared half: the previous batch's new half, in its order
            elif epoch > 0:
                assert batch[b:] == epochs[epoch - 1][-1][:b]  # carried over the epoch boundary (official)
            else:
                assert batch[b:] == batch[:b]  # the run's first batch: no previous one, its new half repeated


def test_partial_layout_is_the_official_one():
    n, b = 10, 4
    epochs = _epochs(LastBatchSampler(n, b, seed=5, last_batch="partial"), range(2))
    assert [len(x) for x in epochs[0]] == [4, 8, 4 + 2]  # first step: new only; last: 2 new + 4 shared
    assert [len(x) for x in epochs[1]] == [4 + 2, 8, 4 + 2]  # the next epoch's first: 4 new + the 2
    assert epochs[1][0][4:] == epochs[0][-1][:2]
    for batches in epochs:  # new samples: 4, 4, 2 per step; each sample new once per epoch
        assert sorted(i for batch, m in zip(batches, [4, 4, 2], strict=True) for i in batch[:m]) == list(range(n))


def test_batches_depend_only_on_seed_and_epoch():
    a, b = LastBatchSampler(50, 8, seed=1), LastBatchSampler(50, 8, seed=1)
    first = _epochs(a, [0, 1, 2, 3])
    assert _epochs(b, [3, 1, 0, 2]) == [first[3], first[1], first[0], first[2]]
    assert _epochs(LastBatchSampler(50, 8, seed=2), [1]) != [first[1]]


@pytest.mark.parametrize("world", [2, 3])
def test_under_data_parallelism_each_ranks_shared_rows_are_its_own_previous_new_rows(world):
    """The loader's paired sharding (src/aikd/data/loaders.py) over DLB's batches, two epochs, every rank."""
    n, b = 50, 12
    for rank in range(world):
        sharded = ShardedBatchSampler(LastBatchSampler(n, b, seed=0), rank, world)
        assert len(sharded) == 5  # the padded last batch is full: never dropped
        previous = None
        for epoch in range(2):
            sharded.set_epoch(epoch)
            for batch in sharded:
                half = len(batch) // 2
                if previous is not None:
                    assert batch[half:] == previous
                previous = batch[:half]


def test_each_rank_reads_its_own_block_of_the_gathered_rows():
    """Two ranks' writes as Strategy.gather_rows pads them (blocks of `rows`, a short part padded with copies of
    its first row): each rank finds its rows; another layout (another world size) finds none."""
    store, classes, rows = LastLogits(3), 3, 5
    parts = [(torch.randn(4, classes), torch.tensor([7, 1, 3, 9])), (torch.randn(3, classes), torch.tensor([2, 8, 0]))]
    padded = [(torch.cat([z, z[:1].expand(rows - len(z), -1)]), torch.cat([i, i[:1].expand(rows - len(i))]))
              for z, i in parts]
    store.write(torch.cat([z for z, _ in padded]), torch.cat([i for _, i in padded]))
    for rank, (z, i) in enumerate(parts):
        logits, found = store.read(i, rank, 2)
        assert found.all() and torch.equal(logits, z)
    assert not store.read(parts[0][1], 0, 3)[1].any()


# ------------------------------------------------------------------------------------- the method, resume


def _method(num_train=10, classes=3, student=None, **settings):
    ctx = MethodContext(num_classes=classes, num_train=num_train, epochs=2, student=student)
    return DLB(DLBConfig(**settings), ctx)


def _batches(sampler, images, labels, epoch):
    sampler.set_epoch(epoch)
    for step, idx in enumerate(sampler):
        idx = torch.tensor(idx)
        yield Batch(images[idx], labels[idx], idx, epoch, step)


def _train(method, model, batches, optimizer):
    losses = []
    for batch in batches:
        out = method.training_step(model, batch)
        loss = sum(out.losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_step_end(model, batch, out)
        losses.append({k: v.item() for k, v in out.losses.items()})
    return losses


def test_steps_follow_the_equation_and_a_state_dict_resume_gives_the_same_next_losses():
    torch.manual_seed(0)
    images, labels = torch.randn(10, 6), torch.arange(10) % 3
    model = nn.Linear(6, 3)
    method = _method(student=model, alpha=0.5, temperature=2.0)
    sampler = method.batch_sampler(4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = list(_batches(sampler, images, labels, 0))
    first = method.training_step(model, batches[0])
    assert first.losses["dlb"].item() == 0.0  # nothing stored: CE on the new half only (dlb.py:96-97)
    assert first.losses["ce"].item() == pytest.approx(F.cross_entropy(model(batches[0].images[:4]),
                                                                      batches[0].targets[:4]).item())
    # Step 2 by hand: the stored logits are step 1's on the new half, after step 1's update.
    _train(method, model, batches[:1], opt)
    stored = method.last.logits.clone()
    with torch.no_grad():
        z_new, z_shared = model(batches[1].images[:4]), model(batches[1].images[4:])
    ce, kl = _reference(z_new.double().numpy(), batches[1].targets[:4].numpy(), z_shared.double().numpy(),
                        batches[1].targets[4:].numpy(), stored.double().numpy(), np.ones(4), 0.5, 2.0)
    out = method.training_step(model, batches[1])
    assert out.losses["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out.losses["dlb"].item() == pytest.approx(kl, rel=1e-5) and kl > 0
    assert out.stats["targets_found"].item() == 1.0
    # Resume after step 2 into a fresh method and model: the next steps' losses are identical.
    _train(method, model, [batches[1]], opt)
    state = method.state_dict()
    assert state["_extra_state"] == {"shared_rows": 0}
    fresh_model = nn.Linear(6, 3)
    fresh_model.load_state_dict(model.state_dict())
    fresh = _method(student=fresh_model, alpha=0.5, temperature=2.0)
    fresh.load_state_dict(state)
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.5)
    rest = batches[2:] + list(_batches(sampler, images, labels, 1))
    assert _train(fresh, fresh_model, rest, fresh_opt) == _train(method, model, rest, opt)


def test_partial_layout_trains_with_the_split_kept_across_a_resume():
    torch.manual_seed(0)
    images, labels = torch.randn(10, 6), torch.arange(10) % 3
    model = nn.Linear(6, 3)
    method = _method(student=model, last_batch="partial")
    sampler = method.batch_sampler(4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    found = []
    for epoch in range(2):
        for batch in _batches(sampler, images, labels, epoch):
            out = method.training_step(model, batch)
            found.append(out.stats["targets_found"].item())
            sum(out.losses.values()).backward()
            method.on_step_end(model, batch, out)
            if epoch == 1 and batch.step == 0:
                assert len(out.logits) == 4  # 4 new + the 2 of the last batch of epoch 0
    assert found == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert method.state_dict()["_extra_state"] == {"shared_rows": 2}
    fresh = _method(student=model, last_batch="partial")
    fresh.load_state_dict(method.state_dict())
    assert fresh.shared_rows == 2
    del opt


def test_partial_layout_is_refused_with_several_processes_and_with_mixing():
    class TwoRanks:
        rank, world_size = 0, 2

    with pytest.raises(ConfigError, match=r"dlb\.last_batch=partial .* needs one process"):
        DLB(DLBConfig(last_batch="partial"), MethodContext(num_classes=3, num_train=10, epochs=1,
                                                           strategy=TwoRanks()))
    method = _method(last_batch="partial")
    soft = torch.full((4, 3), 1 / 3)
    with pytest.raises(ConfigError, match="cannot be mixed"):
        method.training_step(nn.Linear(6, 3), Batch(torch.randn(4, 6), soft, torch.arange(4), 0, 0))
    with pytest.raises(ConfigError, match=r"dlb\.last_batch"):
        DLBConfig(last_batch="drop")


def _stop_after_batch(trainer: Trainer, number: int) -> None:
    """SIGTERM after batch ``number`` of the run (the loop stops at the next step boundary, checkpointed)."""
    original, steps = trainer.method.on_step_end, []

    def hook(model, batch, output):
        original(model, batch, output)
        steps.append(1)
        if len(steps) == number:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.method.on_step_end = hook


@pytest.mark.parametrize("last_batch", ["pad", "partial"])
def test_a_run_stopped_mid_epoch_resumes_exactly(tmp_path, last_batch):
    """A real run (digits, 200 images in 4 steps of 64 new: the last chunk 8 + 56 pads, or 8 alone) stopped after
    batch 6 (epoch 2's second) and resumed equals the straight run: weights, stored logits and every record."""
    cfg = load_config(None, [*DIGITS, f"dlb.last_batch={last_batch}"])
    straight = Trainer(cfg, tmp_path / "straight", quiet=True)
    expected = straight.fit()
    split = Trainer(cfg, tmp_path / "split", quiet=True)
    _stop_after_batch(split, 6)
    with pytest.raises(RunInterrupted):
        split.fit()
    position = load_checkpoint(tmp_path / "split/checkpoints/last.safetensors").state["position"]
    assert (position["epoch"], position["batch"]) == (1, 2)
    resumed = Trainer(cfg, tmp_path / "split", quiet=True).fit(resume=True)
    timing = {"time_per_epoch_s", "train_time_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in expected.items()
                                                                      if k not in timing}
    final = load_checkpoint(tmp_path / "split/checkpoints/last.safetensors")
    reference = load_checkpoint(tmp_path / "straight/checkpoints/last.safetensors")
    for part in ("model",):
        for key, value in getattr(reference, part).items():
            assert torch.equal(getattr(final, part)[key], value), key
    for key, value in reference.state["method"].items():  # the extra state too: the split of the next batch
        assert same_state(final.state["method"][key], value), key
    records = check_loss_records(tmp_path / "straight/metrics.jsonl", {"ce", "dlb"}, 2)
    assert records[0]["stat.targets_found"] == pytest.approx(3 / 4 if last_batch == "pad" else 136 / 200)
    assert records[1]["stat.targets_found"] == 1.0  # every shared row found its own last prediction
    lines = [json.loads(x) for x in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert [r["stat.targets_found"] for r in lines] == [r["stat.targets_found"] for r in records]


# ------------------------------------------------------------------------------------------------ drop-in


def test_dropin_loss_in_a_plain_loop_with_the_sampler_as_batch_sampler():
    torch.manual_seed(0)
    x, y = torch.randn(20, 6), torch.arange(20) % 4
    sampler = LastBatchSampler(len(x), batch_size=8, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
    model = nn.Linear(6, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = DLBLoss(num_classes=4, alpha=1.0, temperature=3.0)
    terms = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for images, labels in loader:
            new, shared = images.chunk(2)
            y_new, y_shared = labels.chunk(2)
            stored = None if criterion.empty else criterion.last.logits.clone()
            z_new, z_shared = model(new), model(shared)
            loss = criterion(z_new, y_new, z_shared, y_shared)
            if stored is not None:  # the same terms as the method's loss on the stored logits
                ce, kl = dlb_loss(z_new, y_new, z_shared, y_shared, stored, torch.ones(8, dtype=torch.bool))
                assert loss.item() == pytest.approx((ce + kl).item(), rel=1e-6)
            terms.append(criterion.terms["dlb"].item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert terms[0] == 0.0 and all(t > 0 for t in terms[1:]) and len(terms) == 6
    fresh = DLBLoss(num_classes=4)
    fresh.load_state_dict(criterion.state_dict())
    assert torch.equal(fresh.last.logits, criterion.last.logits) and not fresh.empty


# ------------------------------------------------------------------------------------ two processes (slow)


@pytest.mark.slow
def test_two_ranks_each_find_their_own_last_predictions(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "run/summary.json").read_text())["world_size"] == 2
    assert records[0]["stat.targets_found"] == pytest.approx(3 / 4) and records[1]["stat.targets_found"] == 1.0


if __name__ == "__main__":  # the torchrun entry point of the test above: one rank of the run
    from aikd.engine import train

    train(load_config(None, [*DIGITS, "deterministic=false", "data.mix=mixup"]), sys.argv[1], quiet=True)
