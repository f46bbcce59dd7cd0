"""Seed sweeps (``aikd sweep``): every (config, seed) pair through the two-phase pipeline.

Layout: ``OUT/<config folder>/<config name>/seed<k>/student`` for each pair and
one phase-1 cache ``OUT/superior/`` shared by all of them, so methods that
need the same superior or teacher model (AI-KD, its ablations, TF-KD self,
KD) train it once per seed. A pair whose run already finished with the same
config is reused, and an unfinished one resumes from its last checkpoint, so
a sweep killed half-way picks up where it stopped when run again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aikd.config import apply_overrides, from_dict, read_yaml
from aikd.engine.checkpoint import atomic_write_bytes
from aikd.engine.pipeline import run_pipeline, split_phase_overrides
from aikd.errors import AikdError


def sweep_dir(out: Path, config: str | Path, seed: int) -> Path:
    config = Path(config)
    return out / config.parent.name / config.stem / f"seed{seed}"


def check_configs(configs: Sequence[str | Path], seeds: Sequence[int], overrides: Sequence[str]) -> None:
    """Validate every config with the overrides before anything trains, so a typo costs seconds, not hours."""
    if not configs or not seeds:
        raise AikdError("A sweep needs at least one config (-c) and one seed (--seeds).")
    common, per_phase = split_phase_overrides(overrides)
    for config in configs:
        data = apply_overrides(read_yaml(config), [*common, *per_phase["phase2"], f"seed={seeds[0]}"])
        from_dict(data, source=str(config))
    clash = {}
    for config in configs:
        key = (Path(config).parent.name, Path(config).stem)
        if key in clash and Path(clash[key]).resolve() != Path(config).resolve():
            raise AikdError(f"Configs '{clash[key]}' and '{config}' would share the output folder "
                            f"{'/'.join(key)}; rename one.")
        clash[key] = config


def run_sweep(configs: Sequence[str | Path], seeds: Sequence[int], out_dir: str | Path,
              overrides: Sequence[str] = (), *, quiet: bool = False, log=print) -> list[dict[str, Any]]:
    """Run every (config, seed) pair, seeds outermost (a first complete table comes early)."""
    check_configs(configs, seeds, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    total = len(configs) * len(seeds)
    for seed in seeds:
        for config in configs:
            run_dir = sweep_dir(out, config, seed)
            log(f"aikd sweep: [{len(done) + 1}/{total}] {config} seed {seed} -> {run_dir}")
            result = run_pipeline(config, [*overrides, f"seed={seed}"], run_dir, cache_dir=out / "superior",
                                  quiet=quiet, log=log)
            done.append({"config": str(config), "seed": seed, "run_dir": str(run_dir / "student"),
                         "top1_err": result["student"]["top1_err"]})
            atomic_write_bytes(out / "sweep.json", json.dumps(done, indent=2).encode())
    return done
