"""The critic's cost, before and after: AI-KD with 10 and with one critic step against No Adv and KD, side by side.

Runs the quick bench's small_cnn step timings for CE, AI-KD (1 and 10 critic steps), No Adv and KD with the aikd on
the path, so that the same script measures two checkouts (PYTHONPATH=<checkout>/src) with the same method list and
the same pairing (bench.steps.pair_ratios' formula, written out here for checkouts that lack it):

    OMP_NUM_THREADS=2 PYTHONPATH=OLD/src python scripts/critic_cost.py --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics

import aikd
from aikd.bench.steps import Setting, step_costs

PAIRS = (("aikd_critic10", "aikd_no_adv"), ("aikd", "kd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    setting = Setting("small_cnn", 1, 28, 10, steps=args.steps, rounds=args.rounds)
    rows = step_costs(setting, ["ce", "aikd", "aikd_critic10", "aikd_no_adv", "kd"])
    by_method = {r["method"]: r for r in rows}
    print(f"aikd from {aikd.__file__}; small_cnn, batch 128, {args.steps} steps per timing, {args.rounds} rounds")
    for r in rows:
        print(f"  {r['method']:15s} {r['ms_per_step']:6.1f} ms/step  {r['ratio']:.3f}x CE")
    for method, reference in PAIRS:
        per_round = [a / b for a, b in zip(by_method[method]["ratios"], by_method[reference]["ratios"], strict=True)]
        print(f"  {method} / {reference}: {statistics.median(per_round):.3f}x (rounds: "
              f"{', '.join(f'{x:.3f}' for x in per_round)})")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
