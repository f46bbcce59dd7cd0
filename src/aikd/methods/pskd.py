"""PS-KD (progressive self-knowledge distillation, Kim et al. ICCV 2021).

The target of sample i in epoch t mixes its label with the student's own
prediction of it in the previous epoch:

    y_i = (1 - a_t) q_i + a_t softmax(z_{t-1,i}),    a_t = a_T (t + 1) / epochs  (t 0-based)

and the loss is the soft-target cross-entropy, summed over classes, batch
mean. Before a sample has a previous prediction (epoch 0) its target is the
label, as in the official code. Previous predictions come from the project's
single :class:`~aikd.methods.buffer.PredictionBuffer` (logits, float16),
written after every optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from aikd.distributed import current, strategy_for
from aikd.methods.base import Batch, Method, MethodContext, StepOutput, register_method, weight
from aikd.methods.buffer import PredictionBuffer
from aikd.methods.functional import soft_cross_entropy, target_probs
from aikd.strategy import Strategy


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = 0.8) -> float:
    """a_t grows linearly from a_T / epochs in the first epoch to a_T in the last."""
    return alpha_T * (epoch + 1) / epochs


def pskd_targets(labels: Tensor, previous_probs: Tensor, has_previous: Tensor, alpha_t: float) -> Tensor:
    """(1 - a_t) q + a_t P_prev for samples with a previous prediction, q for the others."""
    q = target_probs(labels, previous_probs.shape[1])
    mixed = (1 - alpha_t) * q + alpha_t * previous_probs
    return mixed.where(has_previous.unsqueeze(1), q)


@dataclass
class PSKDConfig:
    alpha_T: float = 0.8  # a_T, the final weight of the previous predictions

    def __post_init__(self) -> None:
        weight("pskd.alpha_T", self.alpha_T)


@register_method("pskd", PSKDConfig)
class PSKD(Method):
    label = "PS-KD"

    def __init__(self, hparams: PSKDConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        self.buffer = PredictionBuffer.for_run(ctx)

    @classmethod
    def loss_terms(cls, hparams: PSKDConfig) -> set[str]:
        return {"soft_ce"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        previous, has_previous = self.buffer.read(batch.indices)
        alpha_t = pskd_alpha(batch.epoch, self.ctx.epochs, self.hparams.alpha_T)
        targets = pskd_targets(batch.targets, previous.softmax(dim=1), has_previous, alpha_t)
        return StepOutput(logits, {"soft_ce": soft_cross_entropy(logits.float(), targets)})

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        self.buffer.write(batch.indices, output.logits)


class PSKDLoss(nn.Module):
    """PS-KD as one loss module for a training loop of your own (plain PyTorch, Lightning).

    It holds the previous-epoch buffer (saved with ``state_dict()``). Call it on every training
    batch with the student's logits, the labels, the samples' dataset indices and the 0-based
    epoch; it returns the soft-target cross-entropy and, in training mode, stores the logits.

        criterion = PSKDLoss(num_classes, len(train_set), epochs)
        loss = criterion(student(images), labels, indices, epoch)

    Under data parallelism each write gathers every rank's rows, so a sample's previous prediction is
    found on whichever rank the next reshuffle sends it to; every rank holds the whole buffer (its
    ``state_dict()`` is what your loop saves), where ``aikd train`` shards it (src/aikd/methods/buffer.py).
    ``strategy`` defaults to that of the process group joined by the time of the call
    (:class:`~aikd.methods.aikd.AIKDLoss`).
    """

    def __init__(self, num_classes: int, num_train: int, epochs: int, alpha_T: float = 0.8,
                 strategy: Strategy | None = None) -> None:
        super().__init__()
        PSKDConfig(alpha_T=alpha_T)  # checks the range
        self.epochs, self.alpha_T, self.given_strategy = epochs, alpha_T, strategy
        self.buffer = PredictionBuffer(num_train, num_classes)

    @property
    def strategy(self) -> Strategy:
        """The strategy given, else that of the process group joined by now (a single process without one)."""
        return self.given_strategy if self.given_strategy is not None else strategy_for(current())

    def forward(self, logits: Tensor, labels: Tensor, indices: Tensor, epoch: int) -> Tensor:
        previous, has_previous = self.buffer.read(indices)
        targets = pskd_targets(labels, previous.softmax(dim=1), has_previous,
                               pskd_alpha(epoch, self.epochs, self.alpha_T))
        if self.training:
            self.buffer.strategy = self.strategy  # a write stores every rank's rows
            self.buffer.write(indices, logits)
        return soft_cross_entropy(logits.float(), targets)
