"""AI-KD: adversarial learning and implicit regularization for self-KD.

The student S_t learns from (the AI-KD paper, Section 3; docs/methods/aikd.md)

    L_AI = (1 - a_P - a_G) CE(q, p_t) + a_P L_P + a_G L_G + w L_A
    L_G  = T_G^2 KL(p(z_sup; T_G) || p(z_t; T_G))       guide: the frozen superior model (Eq. 4)
    L_P  = T_P^2 KL(p(z_{t-1}; T_P) || p(z_t; T_P))     progressive: its own previous epoch (Eq. 5)
    L_A  = -E[D(z_t)]                                     adversarial (Eq. 7)

while a WGAN-GP critic D on logits minimises

    L_D  = E[D(z_t)] - E[D(z_sup)] + lambda E[(||grad D(x_hat)||_2 - 1)^2],
    x_hat = e z_sup + (1 - e) z_t,  e ~ U(0, 1) per sample       (Eq. 6)

The pure functions below are the equations, and :func:`aikd_terms` plus
:func:`adversarial_term` the objective (Eq. 8) that both :class:`AIKD` (the
method, composed of its sources and critic) and :class:`AIKDLoss` (the
drop-in loss) minimise. Choices the paper leaves open are config keys, explained
in docs/methods/aikd.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.distributed import current, strategy_for
from aikd.errors import ConfigError
from aikd.methods.base import (
    Batch,
    LossAblation,
    Method,
    MethodContext,
    Part,
    StepOutput,
    non_negative,
    positive,
    register_method,
    require,
)
from aikd.methods.buffer import PredictionBuffer
from aikd.methods.critic import Adversary, Critic, scores
from aikd.methods.functional import distillation_kl, kl_rows_at, target_probs
from aikd.methods.previous import BufferPrevious, SnapshotPrevious
from aikd.methods.superior import EMASuperior, MilestoneSuperior, PretrainedSuperior
from aikd.strategy import SINGLE_PROCESS, Strategy

# --------------------------------------------------------------------------- the equations


def guide_loss(student_logits: Tensor, superior_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """L_G (Eq. 4): the student mimics the frozen superior model, softened by T_G."""
    return distillation_kl(superior_logits, student_logits, temperature)


def progressive_loss(student_logits: Tensor, previous_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """L_P (Eq. 5): the student stays close to its own prediction of the previous epoch."""
    return distillation_kl(previous_logits, student_logits, temperature)


PAPER_CRITIC_STEPS = 117_300  # the paper's CIFAR-100 run: 300 epochs x 391 steps of batch 128, one critic step each


def critic_schedule(student_steps: int, base_lr: float = 1e-4, base_steps: int = 1,
                    reference_steps: int = PAPER_CRITIC_STEPS, max_lr: float = 1e-3,
                    max_steps: int = 10) -> tuple[float, int]:
    """(learning rate, critic steps per student step) that give a run of ``student_steps`` the critic's
    update budget of the paper's run: lr x critic steps = base_lr x base_steps x reference_steps.

    A WGAN critic must be trained well to score anything (its gradient is what L_A follows), and
    what it learns grows with the optimizer's steps and their size. A run r = reference_steps /
    student_steps times shorter first raises the learning rate (up to ``max_lr``), then the
    number of critic steps on each batch (up to ``max_steps``). At the paper's length, or
    longer, it returns (base_lr, base_steps): the paper's values.
    """
    ratio = max(reference_steps / student_steps, 1.0)
    lr = min(base_lr * ratio, max(max_lr, base_lr))
    steps = math.ceil(base_steps * ratio * base_lr / lr - 1e-9)
    return lr, min(steps, max(max_steps, base_steps))


def adversarial_loss(critic: nn.Module, student_logits: Tensor) -> Tensor:
    """L_A (Eq. 7): the student raises the critic's score of its logits (scored in float32: critic.scores)."""
    return -scores(critic, student_logits.float()).mean()


def progressive_term(logits: Tensor, targets: Tensor, previous: Tensor | None, filled: Tensor | None,
                     temperature: float, first_epoch: str = "label") -> Tensor:
    """L_P over a batch where some samples (``filled`` False, or all with ``previous`` None) have no previous
    prediction yet: with ``first_epoch="label"`` their target is the label itself (PS-KD's epoch-0 rule:
    T^2 KL(q || p_t) is T^2 CE at T = 1); with ``"skip"`` they add nothing and the mean is over the batch."""
    if first_epoch == "label":
        q = target_probs(targets, logits.shape[1])
        label_logits = torch.log(q.float().clamp_min(1e-12)) * temperature
        if previous is None:
            previous = label_logits
        elif filled is not None:
            previous = torch.where(filled.unsqueeze(1), previous, label_logits)
        return progressive_loss(logits, previous, temperature)
    if previous is None:
        return logits.new_zeros(())
    if filled is None:
        return progressive_loss(logits, previous, temperature)
    known = torch.where(filled.unsqueeze(1), previous, logits.detach())  # finite rows: 0 x NaN would be NaN
    rows = kl_rows_at(known, logits, temperature) * filled  # a mask, not logits[filled]: no host sync
    return temperature * temperature * rows.mean()


def aikd_terms(h: AIKDConfig, logits: Tensor, targets: Tensor, superior: Tensor | None,
               previous: Tensor | None, filled: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Eq. 8 but L_A: the weighted terms (1 - a_P - a_G) CE, a_G L_G, a_P L_P, and the unweighted L_G, L_P to log.

    Without superior logits (an in-run superior model not switched on yet) the guide's weight goes to CE, as
    in Only Progressive. L_A needs the critic updated on this batch first, so :func:`adversarial_term` adds it.
    """
    ce_weight = 1 - h.alpha_p - (h.alpha_g if superior is not None else 0.0)
    losses = {"ce": ce_weight * F.cross_entropy(logits, targets)}
    stats: dict[str, Tensor] = {}
    if h.alpha_g > 0 and superior is not None:
        l_g = guide_loss(logits.float(), superior, h.temp_g)
        losses["guide"] = h.alpha_g * l_g
        stats["L_G"] = l_g.detach()
    if h.alpha_p > 0:
        l_p = progressive_term(logits.float(), targets, previous, filled, h.temp_p, h.first_epoch)
        losses["progressive"] = h.alpha_p * l_p
        stats["L_P"] = l_p.detach()
    return losses, stats


def read_old_critic_keys(adversary: Adversary) -> Adversary:
    """``adversary``, reading checkpoints written before the critic had one name: their ``state_dict()`` holds its
    weights under ``adversary.disc.*`` (now ``adversary.critic.*``). Kept for one release, as the config's
    ``aikd.disc_*`` keys."""
    adversary.register_load_state_dict_pre_hook(_rename_disc_keys)
    return adversary


def _rename_disc_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    old = prefix + "disc."
    for key in [key for key in state_dict if key.startswith(old)]:
        state_dict[prefix + "critic." + key[len(old):]] = state_dict.pop(key)


def adversarial_term(adversary: Adversary, weight: float, superior: Tensor, logits: Tensor,
                     learn: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """w L_A after the critic learned on this batch's detached logits (Eq. 6): as in WGAN-GP, the freshest
    critic scores the generator. The critic's weights are constants in L_A: it moves the student only."""
    stats: dict[str, Tensor] = {}
    if learn:
        critic = adversary.learn(superior, logits)
        stats.update(L_D=critic.loss, critic_gap=critic.gap, gp=critic.gp)
    l_a = adversarial_loss(adversary.critic, logits)
    stats["L_A"] = l_a.detach()
    return weight * l_a, stats


# --------------------------------------------------------------------------- the parts, for the method and the loss


def paper_critic(h: AIKDConfig, num_classes: int) -> Critic:
    """The paper's critic with the config's settings: the closed form trains it (aikd.methods.critic)."""
    return Critic(num_classes, h.critic_hidden, h.critic_out, h.critic_slope, h.critic_reduce, h.critic_norm)


def build_adversary(h: AIKDConfig, critic: nn.Module, lr: float, steps: int, strategy: Strategy = SINGLE_PROCESS,
                    compile: bool = False) -> Adversary | None:
    """The critic with its Adam (config's betas), or None without the adversarial term: :class:`AIKD`'s and
    :class:`AIKDLoss`'s. ``critic`` is built by the caller, first, since its initial weights are the first numbers
    the method draws; ``lr`` and ``steps`` are the run's (``critic_schedule``)."""
    if h.adv_weight <= 0:
        return None
    return read_old_critic_keys(Adversary(critic, lr, tuple(h.critic_betas) if h.critic_betas else (0.9, 0.999),
                                          steps, h.gp_weight, strategy, compile))


def build_buffer(num_train: int, num_classes: int, ctx: MethodContext | None = None) -> BufferPrevious:
    """z_{t-1} from the student's own last logits per sample: :class:`AIKD`'s ``aikd.previous=buffer`` (``ctx``:
    the run's, whose ranks share the buffer's rows), and :class:`AIKDLoss`'s (a loop of one's own has no student
    to snapshot; every rank holds the whole buffer)."""
    return BufferPrevious(num_train, num_classes, None if ctx is None else PredictionBuffer.for_run(ctx))


# --------------------------------------------------------------------------- the method


@dataclass
class AIKDConfig:
    """AI-KD hyper-parameters; defaults are the paper's (Tables 5-6, Fig. 7, Section 4.2)."""

    alpha_g: float = 0.1  # a_G, weight of the guide loss
    alpha_p: float = 0.3  # a_P, weight of the progressive loss
    temp_g: float = 3.0  # T_G
    temp_p: float = 1.0  # T_P
    adv_weight: float = 0.1  # w, weight of the adversarial loss
    previous: Literal["buffer", "snapshot"] = "buffer"  # source of z_{t-1}, the previous epoch's predictions
    first_epoch: Literal["label", "skip"] = "label"  # L_P target before any previous prediction
    critic_hidden: int = 64
    critic_out: int = 32
    critic_slope: float = 0.2  # LeakyReLU negative slope
    critic_reduce: Literal["mean", "sum"] = "mean"  # 32 critic outputs -> one score
    # The critic's normalisation: "batch", the paper's BatchNorm (batch statistics); "layer" or "none", WGAN-GP's
    # advice (a per-sample score, which the per-sample gradient penalty assumes). docs/methods/aikd.md.
    critic_norm: Literal["batch", "layer", "none"] = "batch"
    critic_lr: float = 1e-4
    critic_betas: list[float] | None = None  # Adam betas; None: PyTorch's (0.9, 0.999)
    gp_weight: float = 10.0
    critic_steps: int = 1  # critic updates per student step, on the same batch
    # "fixed": critic_lr and critic_steps as given (the paper's). "run_length": a run shorter than
    # the paper's CIFAR-100 run (critic_reference_steps student steps) gives the critic the same
    # update budget, lr x steps, by raising critic_lr up to critic_max_lr, then critic_steps up to
    # critic_max_steps (see critic_schedule); equal to "fixed" at the paper's length.
    critic_schedule: Literal["fixed", "run_length"] = "fixed"
    critic_reference_steps: int = PAPER_CRITIC_STEPS
    critic_max_lr: float = 1e-3
    critic_max_steps: int = 10
    # Where the superior logits of L_G and of the critic's "real" side come from (docs/methods/aikd.md,
    # "Online AI-KD"). "pretrained": a frozen model from a separate phase 1 (the paper's). In-run sources,
    # which need no phase 1: "ema", an exponential moving average of the student's weights (decay
    # ema_decay, updated after every optimizer step); "milestone", a frozen copy of the student taken at
    # the start of epoch round(superior_start x epochs). With an in-run source, L_G and L_A switch on at
    # that epoch; before it the student trains with (1 - alpha_p) CE + alpha_p L_P.
    superior: Literal["pretrained", "ema", "milestone"] = "pretrained"
    ema_decay: float = 0.99
    superior_start: float = 0.5  # fraction of the epochs (in-run sources only)

    # Keys renamed so that each thing has one name (the critic, the previous predictions), read under their old
    # names for one release with a warning (aikd.config.build).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "prev": "previous", **{f"disc_{key}": f"critic_{key}"
                               for key in ("hidden", "out", "slope", "reduce", "norm", "lr", "betas")}}

    def __post_init__(self) -> None:
        a_g, a_p = self.alpha_g, self.alpha_p
        require(a_g >= 0 and a_p >= 0 and a_g + a_p <= 1, "aikd.alpha_g", a_g,
                f"and aikd.alpha_p ({a_p}) must be >= 0 and sum to at most 1 (the CE weight is 1 - alpha_p - alpha_g)")
        for key in ("temp_g", "temp_p", "critic_lr", "critic_max_lr", "gp_weight"):
            positive(f"aikd.{key}", getattr(self, key))
        non_negative("aikd.adv_weight", self.adv_weight)
        non_negative("aikd.critic_slope", self.critic_slope)
        for key in ("critic_steps", "critic_reference_steps", "critic_max_steps", "critic_hidden", "critic_out"):
            positive(f"aikd.{key}", getattr(self, key))
        betas = self.critic_betas
        require(betas is None or (len(betas) == 2 and all(0 <= b < 1 for b in betas)),
                "aikd.critic_betas", betas, "holds Adam's two betas in [0, 1), or is null")
        require(0 <= self.ema_decay < 1, "aikd.ema_decay", self.ema_decay, "is a decay in [0, 1)")
        require(0 <= self.superior_start < 1, "aikd.superior_start", self.superior_start,
                "is the fraction of the epochs before the in-run superior model is used, in [0, 1)")
        require(self.superior != "milestone" or self.superior_start > 0, "aikd.superior_start",
                self.superior_start, "must be > 0 with aikd.superior=milestone (a copy at epoch 0 is untrained)")

    @property
    def uses_superior(self) -> bool:
        """L_G or L_A is on: the run needs superior logits from some source."""
        return self.alpha_g > 0 or self.adv_weight > 0


ABLATED_TERMS = ("guide", "progressive", "adv")  # the paper's Table 4 columns: L_G, L_P, L_A
# The ablation names of the terms on besides CE (the paper's Table 4 rows), in the paper's order of rows.
ABLATION_NAMES = {frozenset({"guide"}): "Only Guide", frozenset({"progressive"}): "Only Progressive",
                  frozenset({"guide", "progressive"}): "No Adv", frozenset(ABLATED_TERMS): "AI-KD"}


class AIKDRow(IntEnum):
    """The places of AI-KD's rows among its own in the report's tables (Method.report_row), first to last: the
    paper's Table 4 rows with the pre-trained superior model (in ABLATION_NAMES' order), a combination of
    terms the paper does not name, then the in-run superior models, EMA before milestone, each with all three
    terms first and an ablation of it after."""

    ONLY_GUIDE = 0
    ONLY_PROGRESSIVE = 1
    NO_ADV = 2
    AIKD = 3
    OTHER_TERMS = 4
    ONLINE_EMA = 5
    ONLINE_EMA_ABLATION = 6
    ONLINE_MILESTONE = 7
    ONLINE_MILESTONE_ABLATION = 8


ABLATION_ROWS = {"Only Guide": AIKDRow.ONLY_GUIDE, "Only Progressive": AIKDRow.ONLY_PROGRESSIVE,
                 "No Adv": AIKDRow.NO_ADV, "AI-KD": AIKDRow.AIKD}
# The paper's Table 4 as steps between neighbouring rows: (recipe, reference recipe, the paper's difference in
# Top-1 error on CIFAR-100). AI-KD against CE trained as long is not in the paper; its claim implies a negative sign.
PAPER_STEPS = (
    ("aikd", "aikd_no_adv", 19.87 - 20.34),
    ("aikd_no_adv", "aikd_only_progressive", 20.34 - 21.26),
    ("aikd_no_adv", "aikd_only_guide", 20.34 - 22.17),
    ("aikd_only_guide", "ce", 22.17 - 23.97),
    ("aikd", "ce_equal_compute", None),
)


@register_method("aikd", AIKDConfig)
class AIKD(Method):
    """AI-KD and its ablations (No Adv: w=0; Only Guide: a_P=0, w=0; Only Progressive: a_G=0, w=0).

    Composed of three parts, each present only when its term is on: ``adversary`` (the critic and its
    optimizer), ``previous`` (z_{t-1}: :mod:`aikd.methods.previous`) and ``superior`` (z_sup:
    :mod:`aikd.methods.superior`). The method's hooks forward to them.

    Another critic: override :meth:`build_critic` in a subclass (registered under a name of its own) to return
    any ``nn.Module`` that scores logits (N, C) with (N,); it trains by autograd (docs/methods/aikd.md).
    """

    label = "AI-KD"
    ablation = LossAblation(
        "Table 4", terms=ABLATED_TERMS, columns=("L_G", "L_P", "L_A"), references=("ce",),
        paper_order=("AI-KD", "No Adv", "Only Progressive", "Only Guide", "Baseline"),  # CIFAR-100
        steps=PAPER_STEPS)
    calibration_figure = True  # the paper's Figures 4-5 show AI-KD also after temperature scaling

    requires_teacher = True
    teacher_same_architecture = True

    def __init__(self, hparams: AIKDConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        h = hparams
        self.critic_lr, self.critic_steps = self._critic_budget()
        # The critic first: its initial weights are the first numbers the method draws.
        self.adversary = build_adversary(h, self.build_critic().to(ctx.device), self.critic_lr, self.critic_steps,
                                         ctx.strategy, ctx.compile) if h.adv_weight > 0 else None
        self.previous = self._previous_source() if h.alpha_p > 0 else None
        self.superior = self._superior_source() if h.uses_superior else None

    def _parts(self) -> list[Part]:
        return [part for part in (self.adversary, self.previous, self.superior) if part is not None]

    def build_critic(self) -> nn.Module:
        """The critic D: the paper's (closed form) by default. A subclass may return any module that scores logits
        (N, C) with (N,) or (N, 1); it is trained by autograd (aikd.methods.critic.train_critic)."""
        return paper_critic(self.hparams, self.ctx.num_classes)

    def _previous_source(self) -> BufferPrevious | SnapshotPrevious:
        if self.hparams.previous == "buffer":
            return build_buffer(self.ctx.num_train, self.ctx.num_classes, self.ctx)
        return SnapshotPrevious(self._student("aikd.previous=snapshot"), self.ctx.compile)

    def _superior_source(self) -> PretrainedSuperior | EMASuperior | MilestoneSuperior:
        h = self.hparams
        if h.superior == "pretrained":
            return PretrainedSuperior(self.teacher_logits)
        start_epoch = round(h.superior_start * self.ctx.epochs)
        student = self._student(f"aikd.superior={h.superior}")
        return EMASuperior(student, h.ema_decay, start_epoch, self.ctx.compile) if h.superior == "ema" else \
            MilestoneSuperior(student, start_epoch, self.ctx.compile)

    def _student(self, what: str) -> nn.Module:
        if self.ctx.student is None:
            raise ConfigError(f"{what} copies the student: pass MethodContext(student=model) (the aikd trainer does).")
        return self.ctx.student

    @classmethod
    def needs_teacher(cls, hparams: AIKDConfig) -> bool:
        return hparams.uses_superior and hparams.superior == "pretrained"

    def _critic_budget(self) -> tuple[float, int]:
        """The critic's learning rate and steps per student step under ``critic_schedule``."""
        h, ctx = self.hparams, self.ctx
        if h.critic_schedule == "fixed":
            return h.critic_lr, h.critic_steps
        if ctx.steps_per_epoch is None:
            raise ConfigError("aikd.critic_schedule=run_length needs the run's length: pass "
                              "MethodContext(steps_per_epoch=...) (the aikd trainer does).")
        return critic_schedule(ctx.epochs * ctx.steps_per_epoch, h.critic_lr, h.critic_steps,
                               h.critic_reference_steps, h.critic_max_lr, h.critic_max_steps)

    @classmethod
    def loss_terms(cls, hparams: AIKDConfig) -> set[str]:
        named = {"guide": hparams.alpha_g > 0, "progressive": hparams.alpha_p > 0, "adv": hparams.adv_weight > 0}
        return {"ce", *(name for name, on in named.items() if on)}

    @classmethod
    def report_row(cls, hparams: AIKDConfig) -> tuple[int, str]:
        """The paper's Table 4 names for the terms a run trains with (Only Guide, Only Progressive, No Adv, AI-KD),
        and "AI-KD online (EMA|milestone)" for an in-run superior model; in the paper's order."""
        terms = cls.loss_terms(hparams) - {"ce"}
        name = ABLATION_NAMES.get(frozenset(terms), "AI-KD (" + ", ".join(sorted(terms)) + ")")
        if hparams.superior == "pretrained" or not hparams.uses_superior:
            return ABLATION_ROWS.get(name, AIKDRow.OTHER_TERMS), name
        ema, full = hparams.superior == "ema", name == "AI-KD"
        online = f"AI-KD online ({'EMA' if ema else 'milestone'})"
        place = (AIKDRow.ONLINE_EMA if ema else AIKDRow.ONLINE_MILESTONE) if full else \
            (AIKDRow.ONLINE_EMA_ABLATION if ema else AIKDRow.ONLINE_MILESTONE_ABLATION)
        return place, online if full else f"{online}, {name}"

    @classmethod
    def is_ablation(cls, hparams: AIKDConfig) -> bool:
        return hparams.superior == "pretrained" and not set(ABLATED_TERMS) <= cls.loss_terms(hparams)

    def run_facts(self) -> dict[str, Any]:
        return {"critic_lr": self.critic_lr, "critic_steps": self.critic_steps} if self.adversary else {}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        superior = self.superior.for_batch(batch).logits if self.superior else None
        previous, filled = self.previous.for_batch(batch) if self.previous else (None, None)
        losses, stats = aikd_terms(self.hparams, logits, batch.targets, superior, previous, filled)
        saved = {"superior_logits": superior} if self.adversary and superior is not None else {}
        return StepOutput(logits, losses, stats, saved)

    def update_auxiliary(self, batch: Batch, output: StepOutput) -> None:
        """For a step that stands: the critic learns on this batch, then L_A joins the loss (Eq. 7)."""
        if "superior_logits" not in output.saved:  # no adversarial term, or no superior model yet
            return
        output.losses["adv"], stats = adversarial_term(self.adversary, self.hparams.adv_weight,
                                                       output.saved["superior_logits"], output.logits)
        output.stats.update(stats)

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        for part in self._parts():
            part.on_epoch_start(epoch, model)

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        for part in self._parts():
            part.on_step_end(model, batch, output.logits)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        for part in self._parts():
            part.on_epoch_end(epoch, model)

    def upgrade_state_dict(self, state: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Before issue 34 the critic's optimizer was the method's extra state, ``{"disc_opt": ...}``; it is now the
        adversary's own (``adversary._extra_state``)."""
        if self.adversary is None or "disc_opt" not in extra:
            return state
        return {**state, "adversary._extra_state": {"critic_opt": extra["disc_opt"]}}


# --------------------------------------------------------------------------- a drop-in loss for your own loop


class AIKDLoss(nn.Module):
    """AI-KD as one loss module for a training loop of your own (plain PyTorch, Lightning).

    It holds what AI-KD keeps across steps: the previous-epoch buffer (z_{t-1} by dataset index)
    and the critic with its optimizer, built as :class:`AIKD` builds them; ``state_dict()`` saves them all.
    ``critic`` replaces the paper's critic with any module that scores logits (N, C) with (N,) (trained by
    autograd, docs/methods/aikd.md). Call it on every training
    batch with the student's logits, the labels, the samples' dataset indices and the superior
    model's logits (a frozen pre-trained model's, an :class:`~aikd.methods.ema.EMAModel`'s, or None
    while there is none yet): in training mode it steps the critic once per call (``critic_steps``
    times) and returns L_AI, to which you add nothing before ``backward()``. The terms of the last
    call are in ``last_terms``. Defaults are the paper's; the terms are those of :class:`AIKD`
    (:func:`aikd_terms`, :func:`adversarial_term`).

        criterion = AIKDLoss(num_classes, len(train_set))
        loss = criterion(student(images), labels, indices, superior(images))

    Under data parallelism (DDP, Lightning's ``strategy="ddp"``) it works as ``aikd train`` does: each
    buffer write gathers every rank's rows, so every rank can read every sample's previous logits after
    a reshuffle; the critic's gradients are averaged over the ranks, and every rank starts from rank 0's
    critic. ``strategy`` (an :mod:`aikd.strategy` Strategy) says how this process relates to the others;
    by default it is that of the process group this process has joined (``aikd.distributed.current()``),
    looked up at each call, since Lightning joins the group after the module is built.
    """

    def __init__(self, num_classes: int, num_train: int, alpha_g: float = 0.1, alpha_p: float = 0.3,
                 temp_g: float = 3.0, temp_p: float = 1.0, adv_weight: float = 0.1, critic_lr: float = 1e-4,
                 critic_steps: int = 1, gp_weight: float = 10.0, strategy: Strategy | None = None,
                 critic: nn.Module | None = None) -> None:
        super().__init__()
        h = self.hparams = AIKDConfig(alpha_g=alpha_g, alpha_p=alpha_p, temp_g=temp_g, temp_p=temp_p,
                                      adv_weight=adv_weight, critic_lr=critic_lr, critic_steps=critic_steps,
                                      gp_weight=gp_weight)  # checks the ranges
        self.given_strategy = strategy
        self.adversary = build_adversary(h, critic if critic is not None else paper_critic(h, num_classes),
                                         critic_lr, critic_steps) if adv_weight > 0 else None
        self.previous = build_buffer(num_train, num_classes)
        self.critic_shared = False  # set once every rank holds rank 0's critic
        self.last_terms: dict[str, Tensor] = {}  # the weighted terms of the last call, detached

    @property
    def buffer(self) -> PredictionBuffer:
        """The previous-epoch buffer (z_{t-1} by dataset index)."""
        return self.previous.buffer

    @property
    def strategy(self) -> Strategy:
        """The strategy given, else that of the process group joined by now (a single process without one)."""
        return self.given_strategy if self.given_strategy is not None else strategy_for(current())

    def forward(self, logits: Tensor, labels: Tensor, indices: Tensor, superior_logits: Tensor | None) -> Tensor:
        strategy = self.strategy
        self.buffer.strategy = strategy  # a write stores every rank's rows
        superior = None if superior_logits is None else superior_logits.detach().float()
        previous, filled = self.buffer.read(indices)
        terms, _ = aikd_terms(self.hparams, logits, labels, superior, previous, filled)
        if self.adversary is not None:
            self.adversary.strategy = strategy  # the critic's gradients are averaged over the ranks
            if self.training and strategy.distributed and not self.critic_shared:
                for weights in self.adversary.critic.parameters():  # a Critic's: its one flat theta
                    weights.data.copy_(strategy.gather_rows(weights.data.unsqueeze(0))[0])  # rank 0's, as DDP does
                self.critic_shared = True
            if superior is not None:
                terms["adv"], _ = adversarial_term(self.adversary, self.hparams.adv_weight, superior, logits,
                                                   learn=self.training)
        if self.training:
            self.buffer.write(indices, logits)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return sum(terms.values())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A ``state_dict()`` from before issue 34: the buffer was ``buffer.logits`` and the critic's optimizer this
        module's own extra state; both now belong to the parts (``previous``, ``adversary``), as in :class:`AIKD`."""
        for old, new in (("buffer.logits", "previous.buffer.logits"), ("_extra_state", "adversary._extra_state")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                value = state_dict.pop(prefix + old)
                if new != "adversary._extra_state" or self.adversary is not None:
                    state_dict[prefix + new] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
