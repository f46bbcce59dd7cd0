"""BSS (boundary supporting samples, Heo et al. AAAI 2019): distillation with adversarial samples.

The frozen teacher is attacked toward a class k it finds plausible, producing
samples near its decision boundary between its top-1 class b and k; the
student then matches the teacher on those samples too.

Attack (batched, on the teacher's logits f; docs/methods/amkd.md):
    b = teacher top-1, k ~ softmax(f) over the classes other than b
    repeat up to 10 times:  g = grad_x (f_k - f_b)
        x <- x + eta (f_b - f_k + 1e-4) g / ||g||_2,  eta = 0.3 while the teacher still predicts b, else 0
Base samples: correctly classified by teacher and student; at most 64 per
batch, those with the largest sum_{j != y} (p_T,j - p_S,j)^2.
Loss (T = 3, n = epoch counted from 1 as the official loop does, N = epochs):
    L = CE + a(n) KD(x) + b(n) KD(x_adv),  a(n) = 3 (1 - n/N) + 1,  b(n) = max(2 (1 - 4n / (3N)), 0)
with KD = KL(p(z_T; T) || p(z_S; T)) without a T^2 factor, as in the official code.

Fixed shapes, no host sync (a GPU never waits for the step; docs/methods/amkd.md): the step always
attacks k = min(attack_size, batch) positions, the base samples first in score order and then the
others, with a 0/1 mask of the rows that count; off the CPU the attack always runs its ``attack_steps``
steps (a step in which no row is still active changes nothing, so the numbers are the official early
stop's; on the CPU, where asking costs nothing, it stops there); KD(x_adv) is the mean over the rows
that count, and exactly 0 when fewer than two qualify. Deliberate differences from a version that
selects the rows: the student's train-mode forward on the attacked batch sees all k rows (the masked
ones unattacked, as they came), so BatchNorm's batch statistics there, and its running statistics,
include them; and the target classes are drawn for k rows, so the random stream moves on differently.
Every step, attacking or not, returns the same loss terms and statistics (0 when no sample is
attacked), so the ranks of a data-parallel run sum the same keys, and every rank of an attacking epoch
runs the same forwards, so SyncBatchNorm's collectives match (``train.sync_bn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.methods.base import Batch, Method, StepOutput, hard_labels, non_negative, positive, register_method
from aikd.methods.functional import kl_rows_at, masked_mean


def select_base_samples(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor,
                        max_samples: int = 64) -> tuple[Tensor, Tensor]:
    """(positions, qualifies): the k = min(max_samples, batch) batch positions to attack and which are base samples.

    Base samples are those both models classify right, the largest non-target disagreement first. The
    positions always number k (a count of base samples would be known only to the device): the base
    samples first in score order, then the others, which ``qualifies`` marks False.
    """
    teacher_logits, student_logits = teacher_logits.detach(), student_logits.detach()
    correct = (teacher_logits.argmax(1) == labels) & (student_logits.argmax(1) == labels)
    diff = (F.softmax(teacher_logits, dim=1) - F.softmax(student_logits, dim=1)) ** 2
    score = diff.sum(1) - diff.gather(1, labels.unsqueeze(1)).squeeze(1)  # sum over j != y
    key = torch.where(correct, score, torch.full_like(score, float("-inf")))  # the others last
    positions = torch.argsort(key, descending=True, stable=True)[:min(max_samples, len(labels))]
    return positions, correct[positions]


def sample_attack_targets(teacher_logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """k for each sample: drawn from the teacher's softmax with its top-1 class removed.

    The softmax of the other logits *is* the renormalised teacher softmax without
    the top-1, and unlike renormalising probabilities it cannot underflow to all
    zeros for a very confident teacher.
    """
    logits = teacher_logits.detach().float().clone()
    logits.scatter_(1, logits.argmax(1, keepdim=True), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)


@dataclass
class AttackResult:
    images: Tensor  # the adversarial samples (a masked-out row as it came)
    source: Tensor  # b, the teacher's top-1 class before the attack
    target: Tensor  # k, the class attacked toward
    flipped: Tensor  # the teacher no longer predicts b at the end (False for a masked-out row)
    steps: Tensor  # attack steps in which some row was still active (a tensor: counting waits for nobody)
    mask: Tensor  # the rows attacked: those that count in the boundary losses


def bss_attack(teacher: nn.Module, images: Tensor, targets: Tensor, steps: int = 10, eta: float = 0.3,
               margin: float = 1e-4, mask: Tensor | None = None, stop_early: bool | None = None) -> AttackResult:
    """Move each image (each one ``mask`` keeps; None: all) toward the teacher's boundary between its top-1
    class and ``targets``.

    A row stops moving (eta = 0) once the teacher's prediction has left b, and a step in which no row
    moves adds exactly zero, so running all ``steps`` steps gives the official loop's result, which stops
    there. ``stop_early`` stops there too, which asks the device on every step whether to: by default
    only on the CPU, where asking costs nothing (and the attack, often over in a few steps, 2-3 times
    less); elsewhere all steps run and the host never waits. The teacher must be in eval mode (so samples
    do not interact through BatchNorm); only the images receive gradients, never its weights.
    """
    stop_early = images.device.type == "cpu" if stop_early is None else stop_early
    x = images.detach().clone()
    with torch.no_grad():
        source = teacher(x).argmax(1)
    moving = torch.ones_like(source, dtype=torch.bool) if mask is None else mask
    rows = torch.arange(len(x), device=x.device)
    taken = torch.zeros((), dtype=torch.long, device=x.device)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = teacher(x).float()
            f_b, f_k = logits[rows, source], logits[rows, targets]
            (grad,) = torch.autograd.grad((f_k - f_b).sum(), x)
        active = (logits.argmax(1) == source) & moving
        if stop_early and not bool(active.any()):
            break
        taken += active.any()
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        scale = eta * active.float() * (f_b - f_k + margin).detach() / norm
        x = (x + scale.view(-1, *([1] * (x.dim() - 1))) * grad).detach()
    with torch.no_grad():
        flipped = (teacher(x).argmax(1) != source) & moving
    return AttackResult(x.detach(), source, targets, flipped, taken, moving)


def bss_kd(teacher_logits: Tensor, student_logits: Tensor, temperature: float, mask: Tensor | None = None
           ) -> Tensor:
    """KL(p(z_T; T) || p(z_S; T)), batch mean (over the rows ``mask`` keeps), *without* the usual T^2 factor.

    The official code uses the soft cross-entropy -sum p_T log p_S at T, with no T^2; KL differs from it
    by the teacher's entropy only, a constant for the student, so the gradients are the same (and the
    logged term is 0 at a match).
    """
    rows = kl_rows_at(teacher_logits, student_logits, temperature)
    return rows.mean() if mask is None else masked_mean(rows, mask)


def bss_weights(epoch: int, epochs: int) -> tuple[float, float]:
    """(a(n), b(n)): the clean and adversarial KD weights in the 0-based ``epoch`` of ``epochs``.

    The official loop counts epochs from 1 (``for epoch in range(1, max_epoch + 1)``), so
    n = epoch + 1: its first epoch already uses a(1) = 3 (1 - 1/N) + 1, its last a(N) = 1.
    """
    n, total = epoch + 1, epochs
    return 3 * (1 - n / total) + 1, max(2 * (1 - 4 * n / (3 * total)), 0.0)


@dataclass
class BSSConfig:
    temperature: float = 3.0
    attack_size: int = 64  # base samples per batch
    attack_steps: int = 10
    eta: float = 0.3

    def __post_init__(self) -> None:
        section = type(self).__name__.removesuffix("Config").lower()  # bss, or amkd for its subclass
        positive(f"{section}.temperature", self.temperature)
        positive(f"{section}.attack_size", self.attack_size)
        positive(f"{section}.attack_steps", self.attack_steps)
        non_negative(f"{section}.eta", self.eta)


@register_method("bss", BSSConfig)
class BSS(Method):
    label = "BSS"

    requires_teacher = True

    @classmethod
    def loss_terms(cls, hparams: BSSConfig) -> set[str]:
        return {"ce", "kd", "kd_adv"}  # on every step: kd_adv is 0 while b(n) = 0 or fewer than two qualify

    def adversarial_batch(self, batch: Batch, teacher_logits: Tensor, student_logits: Tensor) -> AttackResult:
        """Select base samples and attack the teacher on them, k rows with the mask of those that count.

        Fewer than two base samples count as none, as when the rows were selected (the student's
        train-mode forward needed two for BatchNorm): the boundary terms are then 0.
        """
        h = self.hparams
        positions, qualifies = select_base_samples(teacher_logits, student_logits, hard_labels(batch.targets),
                                                   h.attack_size)
        counts = qualifies & (qualifies.sum() >= 2)
        targets = sample_attack_targets(teacher_logits[positions])
        return bss_attack(self.ctx.teacher, batch.images[positions], targets, h.attack_steps, h.eta, mask=counts)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        teacher_logits = self.teacher_logits(batch.images)
        w_clean, w_adv = bss_weights(batch.epoch, self.ctx.epochs)
        losses = {
            "ce": F.cross_entropy(logits, batch.targets),
            "kd": w_clean * bss_kd(teacher_logits, logits.float(), h.temperature),
        }
        # Decided on the host from the epoch and the batch's shape, the same on every rank: no sync.
        if w_adv == 0 or min(h.attack_size, len(batch.images)) < 2:
            zero = torch.zeros((), device=logits.device)
            losses.update({name: zero for name in self.loss_terms(h) - set(losses)})
            return StepOutput(logits, losses, {"attack_flipped": zero, "attack_size": zero})
        attack = self.adversarial_batch(batch, teacher_logits, logits)
        teacher_adv = self.teacher_logits(attack.images)
        # A second forward with gradient: through the bare student, since a data-parallel wrapper
        # allows one forward per backward (its gradients add to the same parameters).
        student_adv = (self.ctx.student or model)(attack.images)
        losses.update(self.boundary_losses(batch, logits, teacher_logits, attack, teacher_adv, student_adv, w_adv))
        stats = {"attack_flipped": masked_mean(attack.flipped.float(), attack.mask),
                 "attack_size": attack.mask.sum().float()}
        return StepOutput(logits, losses, stats)

    def boundary_losses(self, batch: Batch, logits: Tensor, teacher_logits: Tensor, attack: AttackResult,
                        teacher_adv: Tensor, student_adv: Tensor, weight: float) -> dict[str, Tensor]:
        """Loss terms on the boundary samples (the rows ``attack.mask`` keeps): KD toward the teacher, times b(n).

        ``logits`` / ``teacher_logits`` are both models' outputs on the clean batch.
        """
        kd = bss_kd(teacher_adv, student_adv.float(), self.hparams.temperature, attack.mask)
        return {"kd_adv": weight * kd}
