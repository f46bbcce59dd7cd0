"""Precision and determinism: what ``train.amp`` picks, float32 evaluation and critic scores under autocast,
strict deterministic mode and its one-line error, and the global average pooling that replaced
AdaptiveAvgPool2d. CPU autocast runs bf16, so a CPU shows what a GPU's mixed precision would change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.runtime import amp_dtype_for, nondeterministic_ops_explained, seed_everything
from aikd.errors import ConfigError
from aikd.methods.aikd import adversarial_loss
from aikd.methods.critic import Critic
from aikd.models import build_model
from aikd.models.base import GlobalAvgPool

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "device=cpu", "train.epochs=1",
          "data.train_limit=200", "data.test_limit=200"]


@pytest.mark.parametrize(("amp", "capability", "dtype"), [
    ("auto", (7, 0), torch.float16),  # V100: bf16 only emulated
    ("auto", (7, 5), torch.float16),  # T4
    ("auto", (8, 0), torch.bfloat16),  # A100
    ("auto", (9, 0), torch.bfloat16),  # H100
    ("bf16", (7, 0), torch.bfloat16),  # asked for: taken
    ("fp16", (9, 0), torch.float16),
    ("off", (9, 0), None),
])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it_natively(amp, capability, dtype):
    assert amp_dtype_for(amp, capability) is dtype


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_is_strict_and_belongs_to_the_run(restore_determinism):
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    seed_everything(0, deterministic=False)  # a later run in the same process is not held to it
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_op_without_a_deterministic_kernel_stops_with_one_line_naming_it(restore_determinism):
    seed_everything(0, deterministic=True)
    pooled, where = F.max_pool2d(torch.randn(1, 1, 4, 4), 2, return_indices=True)
    with pytest.raises(ConfigError) as err, nondeterministic_ops_explained():
        nn.MaxUnpool2d(2)(pooled, where)  # nondeterministic on the CPU too: torch refuses it in strict mode
    message = str(err.value)
    assert "\n" not in message and "max_unpooling2d" in message and "deterministic=false" in message
    with pytest.raises(RuntimeError, match="other"), nondeterministic_ops_explained():
        raise RuntimeError("other errors pass unchanged")


def test_global_average_pooling_gives_adaptive_pooling_bits_on_the_cpu():
    torch.manual_seed(0)
    for shape in [(8, 512, 4, 4), (4, 512, 7, 7), (2, 64, 14, 14), (5, 3, 33, 17)]:
        for channels_last in (False, True):
            x = torch.randn(shape) * 3
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, ref = GlobalAvgPool()(ours), F.adaptive_avg_pool2d(theirs, 1).flatten(1)
            grad = torch.randn_like(ref)
            out.backward(grad)
            ref.backward(grad)
            assert torch.equal(out, ref) and torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "densenet121"])
def test_our_models_pool_without_adaptive_pooling(name):
    model = build_model(name, 10, 3, 32)
    assert not [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]  # no deterministic CUDA backward


def test_the_critic_scores_in_float32_under_autocast():
    torch.manual_seed(0)
    critic, logits = Critic(10), (torch.randn(16, 10) * 5).bfloat16().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.clone().requires_grad_()
        under_autocast = adversarial_loss(critic, low)
    full = logits.clone().requires_grad_()
    reference = adversarial_loss(critic, full)
    under_autocast.backward()
    reference.backward()
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference) and torch.equal(low.grad, full.grad)


def test_evaluation_is_float32_when_training_runs_under_bf16_autocast(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr("aikd.engine.setup.autocast_dtype", lambda cfg, device: torch.bfloat16)  # a GPU's amp
    trainer = Trainer(load_config(None, DIGITS), tmp_path, quiet=True)
    assert trainer.parts.amp_dtype is torch.bfloat16  # training would run under bf16 autocast
    logits = trainer.evaluator.predict()[0]
    model, evaluator = trainer.model.eval(), trainer.evaluator
    with torch.no_grad():
        reference = torch.cat([model(evaluator.prepare(images))
                               for images, _, _ in evaluator.loader(trainer.data.test)])
    assert logits.dtype == torch.float32 and torch.equal(logits, reference)


class UnpoolRoundTrip(nn.Module):
    """Max-pool with indices and unpool back: MaxUnpool2d has no deterministic kernel, on the CPU either."""

    def forward(self, x):
        pooled, where = F.max_pool2d(x, 2, return_indices=True)
        return F.max_unpool2d(pooled, where, 2, output_size=x.shape[-2:])


def test_a_deterministic_run_whose_model_has_such_an_op_stops_with_that_line(tmp_path, restore_determinism, one_thread):
    trainer = Trainer(load_config(None, [*DIGITS, "deterministic=true"]), tmp_path, quiet=True)
    trainer.model.features = nn.Sequential(UnpoolRoundTrip(), trainer.model.features)  # a user's model
    with pytest.raises(ConfigError, match=r"max_unpooling2d\S* .*deterministic=false"):
        trainer.fit()
