"""The interface every training method implements.

A method is a small ``nn.Module`` that turns one batch into *named loss terms*;
the single training loop in :mod:`aikd.engine.loop` sums, backpropagates and
logs them. One step of the loop, and where a method plugs in:

1. :meth:`Method.training_step` (model, batch) -> :class:`StepOutput`: the
   student's forward and the loss terms;
2. the loop decides whether the step stands (finite losses, ``train.on_nonfinite``);
3. :meth:`Method.update_auxiliary` (batch, output): models with optimizers of
   their own (AI-KD's critic) learn from this batch, and may add loss terms that
   use them to the output, only for a step that stands;
4. backward, the student's optimizer step;
5. :meth:`Method.on_step_end` (model, batch, output): after the optimizer step,
   with the bare student: write per-sample buffers, update an EMA copy.

What a method may need beyond that:

* the bare student (not a DDP or compile wrapper): ``ctx.student``, from
  construction on; copies of it (AI-KD's snapshot, an EMA teacher) are ordinary
  sub-modules, saved in ``state_dict()`` and restored on resume with no extra code;
* a frozen teacher / superior model: set ``requires_teacher``; the engine loads
  it, freezes it and hands it over in :class:`MethodContext`;
* the run's other processes: ``ctx.strategy`` (:mod:`aikd.distributed`) gathers
  rows for per-sample buffers and averages a private module's gradients; in a
  single process every call is the identity, so a method never asks which it is;
* training-only modules optimised with the student (AEKT's distillation
  head): return their parameters from :meth:`Method.student_parameters`;
  they are not part of the model, so inference never sees them;
* a different batch sampler (CS-KD's class-wise pairs): override
  :meth:`Method.batch_sampler`;
* checkpointing: ``state_dict()`` is saved with every checkpoint and restored on
  resume: parameters and buffers, and what is neither (a private optimizer's state,
  a number the host keeps) as nn.Module's own extra state (``get_extra_state`` /
  ``set_extra_state``) of the method or of the part that owns it, as for a drop-in loss.

The student is *not* a sub-module (its weights belong to the run, not to the
method); it is passed to :meth:`Method.training_step` on every call, wrapped as
the loop trains it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from aikd.checks import non_negative, positive, require, weight  # noqa: F401 (re-exported: methods import them here)
from aikd.compiling import compiled_forward
from aikd.registry import METHOD_CONFIGS, Registry
from aikd.strategy import SingleProcess, Strategy

if TYPE_CHECKING:
    from aikd.data.loaders import EpochSampler


@dataclass
class Batch:
    """One training batch, already on the device and augmented."""

    images: Tensor
    targets: Tensor  # (N,) class indices, or (N, C) probabilities for mixed samples
    indices: Tensor  # (N,) dataset indices, the key of per-sample state
    epoch: int  # 0-based
    step: int  # optimizer steps taken before this batch


@dataclass
class StepOutput:
    """What a method returns for one batch."""

    logits: Tensor  # the student's logits for the first len(logits) samples of the batch
    losses: dict[str, Tensor]  # weighted terms; the loop minimises their sum
    stats: dict[str, Tensor] = field(default_factory=dict)  # logged, not optimised
    saved: dict[str, Tensor] = field(default_factory=dict)  # kept for the method's later hooks of this step


@dataclass
class MethodContext:
    """Facts about the run a method may need when it is built."""

    num_classes: int
    num_train: int  # training-set size: the length of per-sample buffers
    epochs: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    teacher: nn.Module | None = None  # frozen, eval mode, on ``device``
    train_labels: Tensor | None = None  # (num_train,) labels, for class-aware samplers
    steps_per_epoch: int | None = None  # optimizer steps per epoch, for rules that scale with run length
    student: nn.Module | None = None  # the bare student (no DDP or compile wrapper), on ``device``
    strategy: Strategy = field(default_factory=SingleProcess)  # the run's processes (aikd.distributed)
    compile: bool = False  # train.compile: a method compiles its own steps too (AI-KD's critic, frozen models)
    step_rows: int | None = None  # the most samples one process's step holds (its share of the batch), if known

    def gather_step_rows(self, tensor: Tensor) -> Tensor:
        """Every process's rows of one training step (a prediction buffer's write), in rank order; with
        ``step_rows`` known, without exchanging row counts first, so the host never waits for them. Each
        process's part is then padded with copies of its first row: written by index, a copy stores the
        same value twice."""
        return self.strategy.gather_rows(tensor, rows=self.step_rows)


AblationStep = tuple[str, str, float | None]  # (recipe, reference recipe, the paper's difference in Top-1 error)


@dataclass(frozen=True)
class LossAblation:
    """A method's ablation of its own loss terms: a table of its own in ``aikd report`` (AI-KD's Table 4).

    Opted into by the method (``Method.ablation``), since which terms make an ablation, and the
    paper's claims about them, are the method's: the report holds no method's specifics. The table has
    a check column per term, and a row per recipe of the method or of a ``references`` method (whose
    runs have every term off: CE is AI-KD's Baseline row); its notes compare the rows' order of mean
    Top-1 error with the paper's. The steps table pairs neighbouring rows seed by seed.
    """

    table: str  # the table's name in the report ("Table 4")
    terms: tuple[str, ...]  # the loss terms switched (as loss_terms() names them), one column each
    columns: tuple[str, ...]  # their columns' headers
    references: tuple[str, ...] = ()  # other methods whose runs are rows with every term off
    paper_order: tuple[str, ...] = ()  # row names by the paper's mean Top-1 error, best first
    # Differences between rows as the paper states them; a None difference is not in the paper, and the
    # method's claim is that the recipe's error is lower.
    steps: tuple[AblationStep, ...] = ()

    def switches(self, terms: set[str] | frozenset[str]) -> tuple[bool, ...]:
        """Which of the ablated terms a run with these loss terms trained with, in column order."""
        return tuple(term in terms for term in self.terms)


class Method(nn.Module):
    """Base class: subclasses implement :meth:`training_step`."""

    name: ClassVar[str]
    Config: ClassVar[type]  # the hyper-parameter dataclass, set by @register_method
    requires_teacher: ClassVar[bool] = False
    # Self-distillation methods learn from a copy of the student's own architecture.
    teacher_same_architecture: ClassVar[bool] = False
    # Batches are [anchors | partners] with partner i tied to anchor i (CS-KD): mixing keeps the pairs.
    paired_batches: ClassVar[bool] = False
    # What aikd report reads from the class, and nothing else about the method (its rows' order among the
    # methods is aikd.methods.TABLE_ORDER, where a method not listed follows the listed ones by name):
    # - label: the method's row name in the tables (default: its registered name); report_row() names and
    #   places the rows of its settings (AI-KD's ablations) and is_ablation() keeps a setting out of Tables 2-3;
    # - recipe_rows: recipes that are other runs of the method, not its settings (recipe -> (place, row name));
    # - loss_terms(): the terms its runs trained with (tests/test_meta_device.py holds them to the step's);
    # - ablation: a table of its own that switches its loss terms on and off (AI-KD's Table 4), or None;
    # - calibration_figure: its own recipe (named after it) is drawn also after temperature scaling in the
    #   reliability figures (AI-KD's, as in the paper's Figures 4-5).
    label: ClassVar[str] = ""
    recipe_rows: ClassVar[dict[str, tuple[int, str]]] = {}
    ablation: ClassVar[LossAblation | None] = None
    calibration_figure: ClassVar[bool] = False

    def __init__(self, hparams: Any, ctx: MethodContext) -> None:
        super().__init__()
        self.hparams = hparams
        self.ctx = ctx
        # Under train.compile the teacher's forward is compiled like the student's (a plain attribute: the
        # teacher is not the method's state, and its state_dict() keys stay the same).
        self._teacher_forward = compiled_forward(ctx.teacher, ctx.compile, "train.compile (teacher)")

    @classmethod
    def needs_teacher(cls, hparams: Any) -> bool:
        """Whether this configuration distils from a pre-trained model (AI-KD's ablations may not)."""
        return cls.requires_teacher

    @classmethod
    def loss_terms(cls, hparams: Any) -> set[str]:
        """The names of the loss terms a step with these settings returns once all its parts are on (an in-run
        superior model may switch some on later; no step returns others), logged as loss.<name>. The default
        is a method whose only term is CE's; tests/test_meta_device.py checks every registered method's."""
        return {"ce"}

    @classmethod
    def report_row(cls, hparams: Any) -> tuple[int, str]:
        """(place among this method's rows, row name) of a run with these settings in the report's tables."""
        return 0, cls.label or cls.name

    @classmethod
    def is_ablation(cls, hparams: Any) -> bool:
        """Whether these settings switch parts of the method off: such runs appear in its ablation table only
        (AI-KD's Table 4), not among the methods."""
        return False

    def batch_sampler(self, batch_size: int, seed: int) -> EpochSampler | None:
        """Return a custom epoch batch sampler (what the loaders read: :class:`aikd.data.loaders.EpochSampler`),
        or ``None`` for shuffled batches."""
        return None

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Called before the first batch of every epoch (0-based)."""

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def update_auxiliary(self, batch: Batch, output: StepOutput) -> None:
        """Called once the loop has decided that this step stands, before the backward pass.

        Models with optimizers of their own (AI-KD's critic) learn from this batch here, so a
        skipped step leaves them untouched; loss terms that need the updated model are added
        to ``output.losses`` and ``output.stats``.
        """

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        """Called after the student's optimizer step with the bare student (write buffers, update an EMA copy)."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """Called after the last batch of every epoch."""

    def teacher_logits(self, images: Tensor) -> Tensor:
        """The frozen teacher's logits on ``images``: float32, no gradient.

        The teacher forward is the whole extra cost of AI-KD, KD and TF-KD over CE, so it
        runs under inference mode and in channels_last (the engine stores the teacher so, on
        every device: on CPU too its convolutions run 1.3-2x faster than in NCHW), in the
        loop's autocast. The copy to float32 makes the result an ordinary tensor that the
        losses may save for backward (inference tensors may not be).
        """
        if images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = (self._teacher_forward or self.ctx.teacher)(images)
        return logits.to(torch.float32, copy=True)

    def student_parameters(self) -> list[nn.Parameter]:
        """Method-owned parameters trained by the student's optimizer (AEKT's distillation head)."""
        return []

    def student_parameters_lr_scale(self) -> float:
        """Learning-rate multiplier of :meth:`student_parameters` relative to ``train.lr``."""
        return 1.0

    def run_facts(self) -> dict[str, Any]:
        """Values the method derived from the run (not set in the config) that its summary.json should record."""
        return {}

    def upgrade_state_dict(self, state: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """``state_dict()`` of a checkpoint written before issue 34, when the engine saved a method's extra state
        apart (``method_extra``), in today's layout: ``extra`` becomes the method's own extra state. A method whose
        extra state moved into one of its parts (AI-KD's critic optimizer) overrides this."""
        return {**state, "_extra_state": extra} if extra else state


class Part(nn.Module):
    """A piece of a method's state with the loop's hooks (a source of target logits, a critic, a buffer).

    A method built of parts forwards its hooks to them; each part keeps what it needs
    as sub-modules and buffers, so the method's ``state_dict()`` checkpoints it.
    """

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Before the first batch of ``epoch``, with the bare student."""

    def on_step_end(self, model: nn.Module, batch: Batch, logits: Tensor) -> None:
        """After the student's optimizer step of a step that stood (``logits``: the student's, for ``batch``)."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        """After the last batch of ``epoch``, with the bare student."""


class Targets(NamedTuple):
    """What a :class:`Source` answers for one batch: target logits, and which rows hold one."""

    logits: Tensor | None  # (N, C) float32, no gradient; None: no row has one (yet)
    filled: Tensor | None = None  # (N,) bool, the rows that hold a target; None: all of them


class Source(Part):
    """A part that gives target logits for every batch (AI-KD's previous-epoch and superior models)."""

    def for_batch(self, batch: Batch) -> Targets:
        """The batch's targets; rows without one are masked by ``filled``, or ``logits`` is None for all."""
        raise NotImplementedError


def hard_labels(targets: Tensor) -> Tensor:
    """Class indices of a batch's targets, also when they are mixed soft labels."""
    return targets if targets.ndim == 1 else targets.argmax(dim=1)


METHODS: Registry[type[Method]] = Registry("method", "method")


@dataclass
class NoHparams:
    """Schema of a method without hyper-parameters."""


def register_method(name: str, hparams: type = NoHparams):
    """Class decorator: make a method available as ``method: name`` in configs, with ``hparams`` (a
    dataclass whose ``__post_init__`` checks its ranges) as the schema of the config's ``name:`` section.

    The schema also goes into :data:`aikd.registry.METHOD_CONFIGS`, where the config module finds it without
    importing any method; ``METHODS.remove(name)`` drops it there too."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.Config = hparams
        METHODS.register(name, on_remove=lambda: METHOD_CONFIGS.remove(name))(cls)
        METHOD_CONFIGS.register(name)(hparams)  # what aikd.config validates the section with
        return cls

    return decorator
