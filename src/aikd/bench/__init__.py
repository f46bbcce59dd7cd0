"""Benchmarks (``aikd bench``): costs measured side by side in one run, so their ratios are comparable.

* :mod:`aikd.bench.steps`: every method's training-step time over CE's on the same model, batch and data
  (interleaved with CE, median over rounds);
* :mod:`aikd.bench.inputs`: aikd's data path against torchvision + PIL on the same Fashion-MNIST and
  CIFAR-100 files, alone and feeding the same training steps;
* :mod:`aikd.bench.memory`: peak resident memory of AI-KD over CE (fresh processes) and the prediction
  buffer's bytes per sample, projected to ImageNet-1k;
* :mod:`aikd.bench.report`: the Markdown report; :mod:`aikd.bench.run`: the plans and :func:`run_bench`.
"""

from aikd.bench.report import markdown_report
from aikd.bench.run import FULL_PLAN, QUICK_PLAN, BenchPlan, run_bench
from aikd.bench.steps import Setting

__all__ = ["FULL_PLAN", "QUICK_PLAN", "BenchPlan", "Setting", "markdown_report", "run_bench"]
