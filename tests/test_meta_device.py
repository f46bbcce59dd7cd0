"""The GPU's stand-in in the default suite: every method and every AI-KD variant trains on the meta device.

On ``torch.device("meta")`` a tensor has a shape and no values, so whatever needs a value on the host
raises there: ``.item()``, ``bool(tensor)``, ``int(tensor)``, a shape that depends on the data
(``nonzero``, ``x[mask]``), and a tensor left on the CPU meeting one on the device (except a 0-dim
CPU tensor, which every device, a GPU's too, takes as a plain number). On a GPU each of these makes
the host wait for the device, or fails. Each method is built as the engine builds it
(src/aikd/engine/setup.py, ``_build_method``: a student, a frozen teacher copy in channels_last, one
process) and runs what the loop runs (src/aikd/engine/loop.py): the training step, the guard's
record, the critic's step (``update_auxiliary``), backward and the optimizer step, the buffer and
EMA writes (``on_step_end``), the epoch hooks and the epoch's sums; then evaluation's forward, and
``state_dict`` / ``load_state_dict`` into a method built afresh. The loss terms of every step are held to
the ones the method declares (``Method.loss_terms``, what ``aikd report`` reads), for every registered
method, so the two cannot disagree unseen. Two epochs of two steps cover each
source's switch (the snapshot from epoch 1, the in-run superior models from epoch 1 of 2, BSS's attack
in epoch 0 only) and both of the critic's Adam paths (its first ``step()``, then the fused kernel).

Stand-ins: the meta device lacks two things a step uses, and each gets one narrow stand-in here, for
the meta device only (the fixture ``meta_stand_ins``):

* ``torch.autocast("meta")`` raises (no autocast type for the device). The critic turns autocast off
  around its step (src/aikd/methods/critic.py, ``train_critic``); on meta that context is a no-op.
  Nothing here runs under an enabled autocast: the loop's autocast is off on a CPU run too.
* ``Optimizer.step()`` refuses ``fused=True`` on a device off its list, though the fused Adam kernel
  itself (``torch._fused_adam_``) has a meta implementation. The list gains "meta", so the critic's own
  fused Adam runs, with its on-device skip of a non-finite step: the path a GPU takes.

Not ``FakeTensorMode`` with device "cuda": it runs forward passes on the CPU but not backward ones, and
the backward, the optimizer and the critic's steps are where host syncs hide (the critic's skip, a
buffer write). What stays a sync, and why, is listed in docs/results/meta_device.md.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from aikd.config import TrainConfig
from aikd.engine.guards import NonFiniteWatch
from aikd.engine.loop import EpochSums
from aikd.engine.optim import build_optimizer
from aikd.methods import METHODS, Batch, Method, MethodContext, StepOutput
from aikd.methods.ce import CrossEntropy
from aikd.models import build_model
from aikd.strategy import SINGLE_PROCESS

META = torch.device("meta")
CLASSES, NUM_TRAIN, BATCH, SIZE = 10, 64, 16, 8
EPOCHS, STEPS = 2, 2
# The run length the methods are told (MethodContext.steps_per_epoch): AI-KD's run_length schedule gives this
# run 2 critic steps per student step, enough for the critic's loop, where the 4 steps run would give 10 (each
# of them slow on meta: its ops go through PyTorch's Python reference kernels).
CLAIMED_STEPS_PER_EPOCH = 4000
PROXY = Path(__file__).resolve().parents[1] / "configs" / "fmnist_proxy"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Variant:
    """One method with its settings: a proxy config's, a registered method's defaults, or a code-only setting."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def hparams(self) -> Any:
        """The settings; BSS's and AMKD's attack with 3 steps instead of 10 (the same loop, a third of the time)."""
        config = METHODS.get(self.method).Config
        fast = {"attack_steps": 3} if "attack_steps" in {f.name for f in fields(config)} else {}
        return config(**{**self.settings, **fast})


def proxy_variants() -> list[Variant]:
    """Every config of the proxy regime (all methods, the AI-KD ablations and online sources), its method section;
    then the defaults of a registered method without one (a new method is covered without a list)."""
    found: list[Variant] = []
    for path in sorted(PROXY.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        variant = Variant(path.stem, raw["method"], raw.get(raw["method"]) or {})
        if all((v.method, v.settings) != (variant.method, variant.settings) for v in found):  # ce_equal_compute
            found.append(variant)
    covered = {v.method for v in found}
    return found + [Variant(f"{name}-defaults", name) for name in METHODS.names() if name not in covered]


VARIANTS = [
    *proxy_variants(),
    Variant("aikd-previous-snapshot", "aikd", {"previous": "snapshot"}),
    Variant("aikd-first-epoch-skip", "aikd", {"first_epoch": "skip"}),
    Variant("aikd-online-ema-snapshot", "aikd", {"superior": "ema", "previous": "snapshot"}),
    Variant("aikd-critic-layer-norm-3-steps", "aikd", {"critic_norm": "layer", "critic_steps": 3}),
    Variant("aikd-critic-no-norm", "aikd", {"critic_norm": "none"}),
    Variant("amkd-student-negatives", "amkd", {"negative": "student"}),
]


@pytest.fixture(autouse=True)
def meta_stand_ins(monkeypatch):
    """The two stand-ins of the module docstring, for the meta device only."""
    real_autocast = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if device_type == "meta" else real_autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast)
    optimizers = importlib.import_module("torch.optim.optimizer")  # torch.optim does not export the module
    fused_devices = optimizers._get_fused_kernels_supported_devices
    monkeypatch.setattr(optimizers, "_get_fused_kernels_supported_devices", lambda: [*fused_devices(), "meta"])


def build_on_meta(method_cls: type[Method], hparams: Any, student: nn.Module) -> Method:
    """The method as src/aikd/engine/setup.py builds it, on the meta device."""
    teacher = None
    if method_cls.needs_teacher(hparams):
        teacher = copy.deepcopy(student).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    ctx = MethodContext(num_classes=CLASSES, num_train=NUM_TRAIN, epochs=EPOCHS, device=META,
                        train_labels=torch.arange(NUM_TRAIN) % CLASSES, teacher=teacher,
                        steps_per_epoch=CLAIMED_STEPS_PER_EPOCH,
                        student=student, strategy=SINGLE_PROCESS)
    return method_cls(hparams, ctx).to(META)


def meta_batch(method: Method, epoch: int, step: int) -> Batch:
    size = 2 * BATCH if method.paired_batches else BATCH  # CS-KD's [anchors | partners]
    return Batch(torch.randn(size, 1, SIZE, SIZE, device=META), torch.randint(0, CLASSES, (size,), device=META),
                 torch.randint(0, NUM_TRAIN, (size,), device=META), epoch, step)


def on_meta(tensors: dict[str, Any]) -> list[str]:
    """Names of the tensors that are not on the meta device (a part left on the CPU), also inside a part's extra
    state (a dict: a critic optimizer's moments)."""
    out = []
    for name, value in tensors.items():
        if isinstance(value, dict):
            out += [f"{name}.{inner}" for inner in on_meta({str(k): v for k, v in value.items()})]
        elif isinstance(value, Tensor) and value.device != META:
            out.append(name)
    return out


def train_on_meta(method_cls: type[Method], hparams: Any) -> tuple[Method, nn.Module]:
    """EPOCHS x STEPS steps as src/aikd/engine/loop.py runs them; returns the method and the student.

    Each step's loss terms (after ``update_auxiliary``, as the loop sums them) are checked against the terms the
    method declares (``Method.loss_terms``, which the report reads): no step returns a term it does not declare,
    and every step of the last epoch, when an in-run superior model has switched on, returns them all."""
    declared = method_cls.loss_terms(hparams)
    torch.manual_seed(0)
    student = build_model("small_cnn", CLASSES, 1, SIZE).to(META)
    method = build_on_meta(method_cls, hparams, student)
    optimizer = build_optimizer(student, TrainConfig(), method.student_parameters(),
                                method.student_parameters_lr_scale())
    for epoch in range(EPOCHS):
        student.train()
        method.on_epoch_start(epoch, student)
        watch, sums, keys = NonFiniteWatch(META, epoch, epoch * STEPS, STEPS), EpochSums(META), set()
        for number in range(1, STEPS + 1):
            batch = meta_batch(method, epoch, epoch * STEPS + number - 1)
            out = method.training_step(student, batch)
            watch.record(out.losses, number)
            method.update_auxiliary(batch, out)
            assert set(out.losses) <= declared, f"undeclared loss terms {set(out.losses) - declared}"
            assert epoch < EPOCHS - 1 or set(out.losses) == declared, (
                f"declared loss terms {declared - set(out.losses)} not returned")
            loss = sum(out.losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.on_step_end(student, batch, out)
            sums.add(out, loss, batch)
            assert not on_meta({"logits": out.logits, **out.losses, **out.stats})
            assert all(v.dim() == 0 for v in [*out.losses.values(), *out.stats.values()])
            # The ranks of a data-parallel run all-reduce the epoch's sums key by key: every step of an epoch
            # must return the same keys, whatever its data.
            assert keys in (set(), {*out.losses, *out.stats}), (keys, {*out.losses, *out.stats})
            keys = {*out.losses, *out.stats}
        method.on_epoch_end(epoch, student)
    return method, student


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_every_method_and_variant_trains_on_the_meta_device(variant):
    method_cls, hparams = METHODS.get(variant.method), variant.hparams()
    method, student = train_on_meta(method_cls, hparams)
    # Evaluation's forward (src/aikd/metrics/classification.py, predict): eval mode, inference mode.
    student.eval()
    with torch.inference_mode():
        logits = student(torch.randn(BATCH, 1, SIZE, SIZE, device=META))
    assert logits.shape == (BATCH, CLASSES) and logits.device == META
    # The method's state on the device, and back into a method built afresh (a resume).
    state = method.state_dict()  # its extra state included (a critic's optimizer)
    assert not on_meta(state)
    fresh = build_on_meta(method_cls, hparams, build_model("small_cnn", CLASSES, 1, SIZE).to(META))
    fresh.load_state_dict(state)
    assert set(fresh.state_dict()) == set(state) and not on_meta(fresh.state_dict())


def test_the_variants_cover_every_method_and_the_ai_kd_settings():
    assert {v.method for v in VARIANTS} == set(METHODS.names())
    aikd = [v.hparams() for v in VARIANTS if v.method == "aikd"]
    ablations = {METHODS.get("aikd").report_row(h)[1] for h in aikd}
    assert {"AI-KD", "No Adv", "Only Guide", "Only Progressive"} <= ablations
    assert {h.superior for h in aikd} == {"pretrained", "ema", "milestone"}
    assert {h.previous for h in aikd} == {"buffer", "snapshot"} and {h.first_epoch for h in aikd} == {"label", "skip"}
    assert {h.critic_norm for h in aikd} == {"batch", "layer", "none"}


PLANTED = {  # what a GPU would wait for, or fail on, planted in CE's step
    "item": lambda logits: logits.sum() * float(logits.detach().sum()),
    "bool": lambda logits: logits.sum() if bool((logits > 0).any()) else -logits.sum(),
    "nonzero": lambda logits: logits[logits.argmax(1) == 0].sum(),
    "cpu tensor": lambda logits: (logits + torch.zeros(CLASSES)).sum(),
}


class UndeclaredTerm(CrossEntropy):
    """CE with a second term its loss_terms() does not name."""

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        out = super().training_step(model, batch)
        out.losses["extra"] = 0.0 * out.logits.sum()
        return out


class MissingTerm(CrossEntropy):
    """CE that declares a term its step never returns."""

    @classmethod
    def loss_terms(cls, hparams: Any) -> set[str]:
        return {"ce", "never"}


@pytest.mark.parametrize("method_cls", [UndeclaredTerm, MissingTerm], ids=lambda c: c.__name__)
def test_loss_terms_that_differ_from_the_steps_fail(method_cls):
    """The harness can fail on the loss terms: a step's extra term, or a declared term no step returns."""
    with pytest.raises(AssertionError, match="loss terms"):
        train_on_meta(method_cls, CrossEntropy.Config())


@pytest.mark.parametrize("plant", sorted(PLANTED))
def test_a_host_sync_or_a_cpu_tensor_in_a_step_fails_on_meta(plant):
    """The stand-in can fail: the same harness raises on each kind of sync planted in an otherwise clean step."""

    class Planted(CrossEntropy):
        def training_step(self, model, batch):
            out = super().training_step(model, batch)
            out.losses["planted"] = PLANTED[plant](out.logits)
            return out

    with pytest.raises((RuntimeError, NotImplementedError)):
        train_on_meta(Planted, CrossEntropy.Config())
