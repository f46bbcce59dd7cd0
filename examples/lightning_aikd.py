"""AI-KD inside a PyTorch Lightning module, with aikd's drop-in loss (five lines marked "+ aikd").

    pip install 'aikd[lightning]'
    python examples/lightning_aikd.py            # scikit-learn's digits, 5 epochs on the CPU -> runs/lightning_aikd

The superior model is a frozen pre-trained copy of the student when you pass one (the paper's
AI-KD), else an exponential moving average of the student updated after every step (online
AI-KD, docs/methods/aikd.md). The loss module holds the previous-epoch buffer, the critic and
its optimizer; Lightning's checkpoints carry them through the module's state_dict.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aikd.methods.aikd import AIKDLoss
from aikd.methods.ema import ema_update


def digits_with_indices(limit: int | None = None) -> TensorDataset:
    """(image, label, dataset index) triples: AI-KD's buffer is keyed by the dataset index."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images[:limit], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target[:limit])
    return TensorDataset(images, labels, torch.arange(len(labels)))


class AIKDModule(L.LightningModule):
    def __init__(self, num_classes: int, num_train: int, superior: nn.Module | None = None,
                 ema_decay: float = 0.99, lr: float = 0.05) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(16 * 64, num_classes))
        self.criterion = AIKDLoss(num_classes, num_train)  # + aikd: buffer, critic, critic optimizer
        self.online = superior is None
        self.superior = (superior or copy.deepcopy(self.student)).eval().requires_grad_(False)  # + aikd
        self.ema_decay, self.lr = ema_decay, lr

    def training_step(self, batch, batch_idx):
        images, labels, indices = batch
        logits = self.student(images)
        with torch.no_grad():
            superior = self.superior.eval()(images)  # + aikd (eval: frozen BatchNorm statistics)
        loss = self.criterion(logits, labels, indices, superior)  # + aikd: L_AI, the critic steps inside
        self.log_dict({f"train/{k}": v for k, v in self.criterion.last_terms.items()}, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.online:
            ema_update(self.superior, self.student, self.ema_decay)  # + aikd (online AI-KD only)

    def validation_step(self, batch, batch_idx):
        images, labels, _ = batch
        self.log("val/top1_err", (self.student(images).argmax(1) != labels).float().mean() * 100)
        self.log("val/nll", F.cross_entropy(self.student(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)


def main(epochs: int = 5, limit: int | None = None, out: str = "runs/lightning_aikd",
         **trainer_options) -> tuple[L.Trainer, AIKDModule]:
    """Train on digits; Lightning writes its checkpoints under ``out`` (not the current folder)."""
    data = digits_with_indices(limit)
    train, val = torch.utils.data.random_split(data, [len(data) - len(data) // 5, len(data) // 5],
                                               generator=torch.Generator().manual_seed(0))
    module = AIKDModule(num_classes=10, num_train=len(data))  # indices are the full dataset's
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, **trainer_options)
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))
    return trainer, module


if __name__ == "__main__":
    trainer, _ = main()
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
