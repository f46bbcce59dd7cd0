"""Seed sweeps (``aikd sweep``): every (config, grid point, seed) through the two-phase pipeline.

Layout: ``OUT/<config folder>/<config name>/seed<k>/student`` for each pair
(``OUT/<config folder>/<config name>/<grid point>/seed<k>/student`` with ``--grid``) and
one phase-1 cache ``OUT/superior/`` shared by all of them, so methods that
need the same superior or teacher model (AI-KD, its ablations, TF-KD self,
KD) train it once per seed. A pair whose run already finished with the same
config is reused, and an unfinished one resumes from its last checkpoint, so
a sweep killed half-way picks up where it stopped when run again.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aikd.config import apply_overrides, from_dict, read_yaml
from aikd.engine.checkpoint import atomic_write_bytes
from aikd.engine.pipeline import run_pipeline, split_phase_overrides
from aikd.errors import AikdError


class GridPoint(tuple):
    """One combination of ``--grid`` values: ((key, value text), ...), in the order the keys were given."""

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self]

    @property
    def name(self) -> str:
        """The point's folder and its tag in report rows: ``aikd.alpha_p=0.1,aikd.temp_g=3`` ('' without a grid)."""
        return ",".join(f"{key}={value}".replace("/", "_") for key, value in self)


def parse_grid(specs: Sequence[str]) -> list[GridPoint]:
    """``["aikd.alpha_p=0.1,0.3", "aikd.w=0,0.1"]`` -> every combination of the values (one empty point without a grid).

    Values are split at commas outside brackets, so a list value stays whole
    (``train.milestones=[0.5,0.75],[0.3,0.6]``).
    """
    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        items = _split_values(values)
        if not eq or not key or not items or any(not v for v in items):
            raise AikdError(f"--grid '{spec}' must look like KEY=V1,V2,..., for example "
                            f"--grid aikd.alpha_p=0.1,0.3,0.5.")
        if key in (k for k, _ in axes):
            raise AikdError(f"--grid names '{key}' twice; give all its values in one --grid {key}=V1,V2,...")
        axes.append((key, items))
    for key, items in axes:
        if len(set(items)) < len(items):
            raise AikdError(f"--grid {key} repeats a value: {','.join(items)}.")
    return [GridPoint(zip([k for k, _ in axes], combo, strict=True))
            for combo in itertools.product(*(items for _, items in axes))]


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    return [*values, current.strip()] if text.strip() else []


NO_GRID = GridPoint()


def sweep_dir(out: Path, config: str | Path, seed: int, point: GridPoint = NO_GRID) -> Path:
    config = Path(config)
    folder = out / config.parent.name / config.stem
    return (folder / point.name if point else folder) / f"seed{seed}"


def check_configs(configs: Sequence[str | Path], seeds: Sequence[int], overrides: Sequence[str],
                  grid: Sequence[GridPoint] = (NO_GRID,)) -> None:
    """Validate every config and grid point with the overrides before anything trains, so a typo (or a value out
    of range) costs seconds, not hours."""
    if not configs or not seeds:
        raise AikdError("A sweep needs at least one config (-c) and one seed (--seeds).")
    for config, point in itertools.product(configs, grid):
        common, per_phase = split_phase_overrides([*overrides, *point.overrides])
        data = apply_overrides(read_yaml(config), [*common, *per_phase["phase2"], f"seed={seeds[0]}"])
        where = f"{config} with --grid {' '.join(point.overrides)}" if point else str(config)
        from_dict(data, source=where)
    clash = {}
    for config in configs:
        key = (Path(config).parent.name, Path(config).stem)
        if key in clash and Path(clash[key]).resolve() != Path(config).resolve():
            raise AikdError(f"Configs '{clash[key]}' and '{config}' would share the output folder "
                            f"{'/'.join(key)}; rename one.")
        clash[key] = config


def run_sweep(configs: Sequence[str | Path], seeds: Sequence[int], out_dir: str | Path,
              overrides: Sequence[str] = (), *, grid: Sequence[str] = (), cache_dir: str | Path | None = None,
              quiet: bool = False, log=print) -> list[dict[str, Any]]:
    """Run every (config, grid point, seed), seeds outermost (a first complete table comes early).

    ``grid`` holds ``KEY=V1,V2,...`` specs (``--grid``); each combination of their values
    is one more set of overrides, run into its own folder and tagged in the run's recipe
    (``aikd[aikd.alpha_p=0.1]``) so that ``aikd report`` shows it as its own row.
    ``cache_dir`` holds the phase-1 models (default ``OUT/superior``): another sweep's cache
    lends its models to this one.
    """
    points = parse_grid(grid)
    check_configs(configs, seeds, overrides, points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    total = len(configs) * len(points) * len(seeds)
    for seed in seeds:
        for config, point in itertools.product(configs, points):
            run_dir = sweep_dir(out, config, seed, point)
            where = f" [{point.name}]" if point else ""
            log(f"aikd sweep: [{len(done) + 1}/{total}] {config}{where} seed {seed} -> {run_dir}")
            result = run_pipeline(config, [*overrides, *point.overrides, f"seed={seed}"], run_dir,
                                  cache_dir=Path(cache_dir) if cache_dir else out / "superior", quiet=quiet, log=log,
                                  variant=point.name or None)
            done.append({"config": str(config), "grid": dict(point), "seed": seed, "run_dir": str(run_dir / "student"),
                         "top1_err": result["student"]["top1_err"]})
            atomic_write_bytes(out / "sweep.json", json.dumps(done, indent=2).encode())
    return done
