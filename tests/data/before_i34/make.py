"""Write checkpoints in the layout before issue 34 (method_extra; AIKDLoss's _extra_state at its top level).

Run at commit 81a26c9 as `python tests/data/before_i34/make.py OUT`; tests/test_old_checkpoints.py reads what it wrote.
"""
import sys
from pathlib import Path

import torch

from aikd.config import load_config
from aikd.engine.trainer import Trainer
from aikd.methods.aikd import AIKDLoss

out = Path(sys.argv[1])
cfg = load_config(None, ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true",
                         "train.epochs=2", "data.train_limit=200", "data.test_limit=50", "method=aikd",
                         "aikd.superior=ema", "aikd.superior_start=0"])
Trainer(cfg, out / "run", quiet=True).fit(stop_after=1)
torch.manual_seed(0)
criterion = AIKDLoss(3, 8)
logits, sup = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
criterion(logits, torch.arange(8) % 3, torch.arange(8), sup).backward()
torch.save(criterion.state_dict(), out / "aikd_loss.pt")
