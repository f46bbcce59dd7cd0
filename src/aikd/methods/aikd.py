"""AI-KD: adversarial learning and implicit regularization for self-KD.

The student S_t learns from (seeds/aikd-paper.md, Section 3; METHODS.md)

    L_AI = (1 - a_P - a_G) CE(q, p_t) + a_P L_P + a_G L_G + w L_A
    L_G  = T_G^2 KL(p(z_sup; T_G) || p(z_t; T_G))       guide: the frozen superior model (Eq. 4)
    L_P  = T_P^2 KL(p(z_{t-1}; T_P) || p(z_t; T_P))     progressive: its own previous epoch (Eq. 5)
    L_A  = -E[D(z_t)]                                     adversarial (Eq. 7)

while a WGAN-GP critic D on logits minimises

    L_D  = E[D(z_t)] - E[D(z_sup)] + lambda E[(||grad D(x_hat)||_2 - 1)^2],
    x_hat = e z_sup + (1 - e) z_t,  e ~ U(0, 1) per sample       (Eq. 6)

The pure functions below are the equations; :class:`AIKD` wires them into
the training loop. Choices the paper leaves open are config keys, explained
in docs/methods/aikd.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.compiling import compiled_or_eager
from aikd.errors import ConfigError
from aikd.methods.base import Batch, Method, MethodContext, StepOutput, non_negative, positive, register_method, require
from aikd.methods.buffer import PredictionBuffer
from aikd.methods.critic import Critic, critic_optimizer, train_critic
from aikd.methods.ema import ema_update, frozen_copy
from aikd.methods.functional import distillation_kl

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
    """L_A (Eq. 7): the student raises the critic's score of its logits."""
    return -critic(student_logits.float()).mean()


# --------------------------------------------------------------------------- the method


@dataclass
class AIKDConfig:
    """AI-KD hyper-parameters; defaults are the paper's (Tables 5-6, Fig. 7, Section 4.2)."""

    alpha_g: float = 0.1  # a_G, weight of the guide loss
    alpha_p: float = 0.3  # a_P, weight of the progressive loss
    temp_g: float = 3.0  # T_G
    temp_p: float = 1.0  # T_P
    adv_weight: float = 0.1  # w, weight of the adversarial loss
    prev: Literal["buffer", "snapshot"] = "buffer"  # source of z_{t-1}
    first_epoch: Literal["label", "skip"] = "label"  # L_P target before any previous prediction
    disc_hidden: int = 64
    disc_out: int = 32
    disc_slope: float = 0.2  # LeakyReLU negative slope
    disc_reduce: Literal["mean", "sum"] = "mean"  # 32 critic outputs -> one score
    # The critic's normalisation: "batch", the paper's BatchNorm (batch statistics); "layer" or "none", WGAN-GP's
    # advice (a per-sample score, which the per-sample gradient penalty assumes). docs/methods/aikd.md.
    disc_norm: Literal["batch", "layer", "none"] = "batch"
    disc_lr: float = 1e-4
    disc_betas: list[float] | None = None  # Adam betas; None: PyTorch's (0.9, 0.999)
    gp_weight: float = 10.0
    critic_steps: int = 1  # critic updates per student step, on the same batch
    # "fixed": disc_lr and critic_steps as given (the paper's). "run_length": a run shorter than
    # the paper's CIFAR-100 run (critic_reference_steps student steps) gives the critic the same
    # update budget, lr x steps, by raising disc_lr up to critic_max_lr, then critic_steps up to
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

    def __post_init__(self) -> None:
        a_g, a_p = self.alpha_g, self.alpha_p
        require(a_g >= 0 and a_p >= 0 and a_g + a_p <= 1, "aikd.alpha_g", a_g,
                f"and aikd.alpha_p ({a_p}) must be >= 0 and sum to at most 1 (the CE weight is 1 - alpha_p - alpha_g)")
        for key in ("temp_g", "temp_p", "disc_lr", "critic_max_lr", "gp_weight"):
            positive(f"aikd.{key}", getattr(self, key))
        non_negative("aikd.adv_weight", self.adv_weight)
        non_negative("aikd.disc_slope", self.disc_slope)
        for key in ("critic_steps", "critic_reference_steps", "critic_max_steps", "disc_hidden", "disc_out"):
            positive(f"aikd.{key}", getattr(self, key))
        require(self.disc_betas is None or (len(self.disc_betas) == 2 and all(0 <= b < 1 for b in self.disc_betas)),
                "aikd.disc_betas", self.disc_betas, "holds Adam's two betas in [0, 1), or is null")
        require(0 <= self.ema_decay < 1, "aikd.ema_decay", self.ema_decay, "is a decay in [0, 1)")
        require(0 <= self.superior_start < 1, "aikd.superior_start", self.superior_start,
                "is the fraction of the epochs before the in-run superior model is used, in [0, 1)")
        require(self.superior != "milestone" or self.superior_start > 0, "aikd.superior_start",
                self.superior_start, "must be > 0 with aikd.superior=milestone (a copy at epoch 0 is untrained)")

    @property
    def uses_superior(self) -> bool:
        """L_G or L_A is on: the run needs superior logits from some source."""
        return self.alpha_g > 0 or self.adv_weight > 0


@register_method("aikd", AIKDConfig)
class AIKD(Method):
    """AI-KD and its ablations (No Adv: w=0; Only Guide: a_P=0, w=0; Only Progressive: a_G=0, w=0)."""

    requires_teacher = True
    teacher_same_architecture = True

    def __init__(self, hparams: AIKDConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        h = hparams
        self.use_adv = h.adv_weight > 0
        self.use_prev = h.alpha_p > 0
        self.critic_lr, self.critic_steps = self._critic_budget()
        if self.use_adv:
            self.disc = Critic(ctx.num_classes, h.disc_hidden, h.disc_out, h.disc_slope, h.disc_reduce, h.disc_norm)
            self.disc.to(ctx.device)
            betas = tuple(h.disc_betas) if h.disc_betas else (0.9, 0.999)
            self.disc_opt = critic_optimizer(self.disc, self.critic_lr, betas)
            # With train.compile the critic's closed-form step is compiled too (it has no double backward).
            self.critic_grad = compiled_or_eager(self.disc.loss_and_grad, "train.compile (critic)") if ctx.compile \
                else self.disc.loss_and_grad
        if self.use_prev and h.prev == "buffer":
            self.buffer = PredictionBuffer(ctx.num_train, ctx.num_classes, gather_rows=ctx.strategy.gather_rows)
        if self.use_prev and h.prev == "snapshot":
            # The student's weights at the end of the previous epoch: an ordinary frozen sub-module (saved
            # and restored with state_dict()), holding a copy of the student until the first epoch ends.
            self.snapshot = self._copy_of_student("aikd.prev=snapshot")
            self.register_buffer("snapshot_ready", torch.zeros((), dtype=torch.bool))
        self.online = h.superior != "pretrained" and h.uses_superior
        if self.online:  # the in-run superior model: ordinary state, like the snapshot
            self.superior_model = self._copy_of_student(f"aikd.superior={h.superior}")
            self.start_epoch = round(h.superior_start * ctx.epochs)
            self.register_buffer("superior_ready", torch.tensor(h.superior == "ema"))

    def train(self, mode: bool = True) -> AIKD:
        """Train mode for the critic only: the frozen copies of the student (snapshot, in-run superior
        model) always answer in eval mode (BatchNorm's running statistics, no dropout)."""
        super().train(mode)
        for frozen in ("snapshot", "superior_model"):
            if hasattr(self, frozen):
                getattr(self, frozen).eval()
        return self

    def _copy_of_student(self, what: str) -> nn.Module:
        if self.ctx.student is None:
            raise ConfigError(f"{what} copies the student: pass MethodContext(student=model) (the aikd trainer does).")
        return frozen_copy(self.ctx.student)

    @classmethod
    def needs_teacher(cls, hparams: AIKDConfig) -> bool:
        return hparams.uses_superior and hparams.superior == "pretrained"

    def _critic_budget(self) -> tuple[float, int]:
        """The critic's learning rate and steps per student step under ``critic_schedule``."""
        h, ctx = self.hparams, self.ctx
        if h.critic_schedule == "fixed":
            return h.disc_lr, h.critic_steps
        if ctx.steps_per_epoch is None:
            raise ConfigError("aikd.critic_schedule=run_length needs the run's length: pass "
                              "MethodContext(steps_per_epoch=...) (the aikd trainer does).")
        return critic_schedule(ctx.epochs * ctx.steps_per_epoch, h.disc_lr, h.critic_steps,
                               h.critic_reference_steps, h.critic_max_lr, h.critic_max_steps)

    @classmethod
    def loss_terms(cls, hparams: AIKDConfig) -> set[str]:
        named = {"guide": hparams.alpha_g > 0, "prev": hparams.alpha_p > 0, "adv": hparams.adv_weight > 0}
        return {"ce", *(name for name, on in named.items() if on)}

    def run_facts(self) -> dict[str, Any]:
        return {"critic_lr": self.critic_lr, "critic_steps": self.critic_steps} if self.use_adv else {}

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        # A run resumed inside the start epoch already holds its copy: it is not taken again from a later student.
        milestone = self.online and self.hparams.superior == "milestone"
        if milestone and epoch == self.start_epoch and not self.superior_ready:
            self.superior_model.load_state_dict(model.state_dict())
            self.superior_ready.fill_(True)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        if self.use_prev and self.hparams.prev == "snapshot":
            self.snapshot.load_state_dict(model.state_dict())
            self.snapshot_ready.fill_(True)

    def _superior_logits(self, batch: Batch) -> Tensor | None:
        """The superior model's logits on the batch: the pretrained teacher's, the in-run model's once it is
        switched on, or None (no superior term this step)."""
        if not self.hparams.uses_superior:
            return None
        if not self.online:
            return self.teacher_logits(batch.images)
        if batch.epoch < self.start_epoch or not self.superior_ready:
            return None
        with torch.inference_mode():
            logits = self.superior_model(batch.images)
        return logits.to(torch.float32, copy=True)

    def _previous_logits(self, batch: Batch) -> tuple[Tensor | None, Tensor | None]:
        """z_{t-1} for the batch and the mask of samples that have one."""
        if self.hparams.prev == "buffer":
            return self.buffer.read(batch.indices)
        if not self.snapshot_ready:
            return None, None
        with torch.no_grad():
            return self.snapshot(batch.images).float(), None

    def _progressive_term(self, logits: Tensor, batch: Batch) -> Tensor:
        h = self.hparams
        previous, filled = self._previous_logits(batch)
        if h.first_epoch == "label":
            one_hot = batch.targets if batch.targets.ndim == 2 else F.one_hot(batch.targets, logits.shape[1])
            # A target of exactly the label: T^2 KL(q || p_t) = T^2 CE at T = 1 (PS-KD's epoch-0 rule).
            label_logits = torch.log(one_hot.float().clamp_min(1e-12)) * h.temp_p
            if previous is None:
                previous = label_logits
            elif filled is not None:
                previous = torch.where(filled.unsqueeze(1), previous, label_logits)
            return progressive_loss(logits, previous, h.temp_p)
        if previous is None:
            return logits.new_zeros(())
        if filled is None:
            return progressive_loss(logits, previous, h.temp_p)
        n = int(filled.sum())
        if n == 0:
            return logits.new_zeros(())
        return progressive_loss(logits[filled], previous[filled], h.temp_p) * (n / len(filled))

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        sup = self._superior_logits(batch)
        # Before an in-run superior model switches on, its weight goes to CE (as in Only Progressive).
        ce_weight = 1 - h.alpha_p - (h.alpha_g if sup is not None else 0.0)
        losses = {"ce": ce_weight * F.cross_entropy(logits, batch.targets)}
        stats: dict[str, Tensor] = {}
        if h.alpha_g > 0 and sup is not None:
            l_g = guide_loss(logits.float(), sup, h.temp_g)
            losses["guide"] = h.alpha_g * l_g
            stats["L_G"] = l_g.detach()
        if self.use_prev:
            l_p = self._progressive_term(logits.float(), batch)
            losses["prev"] = h.alpha_p * l_p
            stats["L_P"] = l_p.detach()
        saved = {"superior_logits": sup} if self.use_adv and sup is not None else {}
        return StepOutput(logits, losses, stats, saved)

    def update_auxiliary(self, batch: Batch, output: StepOutput) -> None:
        """For a step that stands: the critic learns on this batch's detached logits (Eq. 6), then the student's
        L_A (Eq. 7) is scored by the updated critic, as in WGAN-GP, where the freshest critic scores the generator."""
        if "superior_logits" not in output.saved:  # no adversarial term, or no superior model yet
            return
        h, logits = self.hparams, output.logits
        critic = train_critic(self.disc, self.disc_opt, output.saved["superior_logits"], logits, self.critic_steps,
                              h.gp_weight, self.ctx.strategy, self.critic_grad)
        output.stats.update(L_D=critic.loss, critic_gap=critic.gap, gp=critic.gp)
        l_a = adversarial_loss(self.disc, logits)  # the critic's weights are constants here: L_A moves the student
        output.losses["adv"] = h.adv_weight * l_a
        output.stats["L_A"] = l_a.detach()

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        if self.use_prev and self.hparams.prev == "buffer":
            self.buffer.write(batch.indices, output.logits)
        if self.online and self.hparams.superior == "ema":
            ema_update(self.superior_model, model, self.hparams.ema_decay)

    def extra_state(self) -> dict[str, Any]:
        return {"disc_opt": self.disc_opt.state_dict()} if self.use_adv else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.use_adv:
            self.disc_opt.load_state_dict(state["disc_opt"])


# --------------------------------------------------------------------------- a drop-in loss for your own loop


class AIKDLoss(nn.Module):
    """AI-KD as one loss module for a training loop of your own (plain PyTorch, Lightning).

    It holds what AI-KD keeps across steps: the previous-epoch buffer (z_{t-1} by dataset index)
    and the critic with its optimizer; ``state_dict()`` saves them all. Call it on every training
    batch with the student's logits, the labels, the samples' dataset indices and the superior
    model's logits (a frozen pre-trained model's, an EMA copy's, or None while there is none yet):
    in training mode it steps the critic once per call (``critic_steps`` times) and returns
    L_AI, to which you add nothing before ``backward()``. The terms of the last call are in
    ``last_terms``. Defaults are the paper's.

        criterion = AIKDLoss(num_classes, len(train_set))
        loss = criterion(student(images), labels, indices, superior(images))
    """

    def __init__(self, num_classes: int, num_train: int, alpha_g: float = 0.1, alpha_p: float = 0.3,
                 temp_g: float = 3.0, temp_p: float = 1.0, adv_weight: float = 0.1, critic_lr: float = 1e-4,
                 critic_steps: int = 1, gp_weight: float = 10.0) -> None:
        super().__init__()
        AIKDConfig(alpha_g=alpha_g, alpha_p=alpha_p, temp_g=temp_g, temp_p=temp_p, adv_weight=adv_weight,
                   disc_lr=critic_lr, critic_steps=critic_steps, gp_weight=gp_weight)  # checks the ranges
        self.alpha_g, self.alpha_p, self.temp_g, self.temp_p = alpha_g, alpha_p, temp_g, temp_p
        self.adv_weight, self.critic_steps, self.gp_weight = adv_weight, critic_steps, gp_weight
        self.buffer = PredictionBuffer(num_train, num_classes)
        self.critic = Critic(num_classes)
        self.critic_opt = critic_optimizer(self.critic, critic_lr)
        self.last_terms: dict[str, Tensor] = {}  # the weighted terms of the last call, detached

    def forward(self, logits: Tensor, labels: Tensor, indices: Tensor, superior_logits: Tensor | None) -> Tensor:
        logits32 = logits.float()
        previous, seen = self.buffer.read(indices)
        label_logits = torch.log((labels if labels.ndim == 2 else F.one_hot(labels, logits.shape[1])).float()
                                 .clamp_min(1e-12)) * self.temp_p  # before a previous prediction: the label
        l_p = progressive_loss(logits32, torch.where(seen.unsqueeze(1), previous, label_logits), self.temp_p)
        terms = {"prev": self.alpha_p * l_p}
        ce_weight = 1 - self.alpha_p
        if superior_logits is not None:
            sup = superior_logits.detach().float()
            ce_weight -= self.alpha_g
            terms["guide"] = self.alpha_g * guide_loss(logits32, sup, self.temp_g)
            if self.adv_weight > 0:
                if self.training:
                    train_critic(self.critic, self.critic_opt, sup, logits32, self.critic_steps, self.gp_weight)
                terms["adv"] = self.adv_weight * adversarial_loss(self.critic, logits32)
        terms["ce"] = ce_weight * F.cross_entropy(logits32, labels)
        if self.training:
            self.buffer.write(indices, logits)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return sum(terms.values())

    def get_extra_state(self) -> dict[str, Any]:
        return {"critic_opt": self.critic_opt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.critic_opt.load_state_dict(state["critic_opt"])
