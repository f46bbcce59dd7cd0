"""The configs that ship inside the package, found by name wherever pip put it.

``-c fmnist_proxy/aikd`` works from any folder once aikd is installed: a path that exists wins,
otherwise the name is looked up here (with or without ``.yaml``). In a clone, ``configs/`` at the
repository root is a link to this same folder, so the README's ``-c configs/...`` paths still work.
"""

from __future__ import annotations

from pathlib import Path

from aikd.errors import ConfigError, did_you_mean

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Every shipped config's name (``fmnist_proxy/aikd``), sorted."""
    return sorted(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in CONFIG_ROOT.rglob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The shipped file named ``name`` (``fmnist_proxy/aikd``, ``fmnist_proxy/aikd.yaml``, or a shipped folder
    such as ``fmnist_proxy``), else None."""
    text = name.removeprefix("configs/")
    for candidate in (CONFIG_ROOT / text, CONFIG_ROOT / f"{text}.yaml"):
        if (candidate.is_file() and candidate.suffix == ".yaml") or (candidate.is_dir() and text):
            return candidate
    return None


def resolve_config(text: str | Path) -> Path:
    """A config path as the user meant it: an existing file or folder, else the shipped config of that name.

    A name that is neither is refused with the closest shipped names, so a typo costs one line.
    """
    path = Path(text).expanduser()
    if path.exists():
        return path
    shipped = shipped_config(str(text))
    if shipped is not None:
        return shipped
    names = shipped_configs()
    hint = did_you_mean(str(text).removesuffix(".yaml").removeprefix("configs/"), names)
    raise ConfigError(f"Config file '{text}' does not exist, and no shipped config has that name ('aikd configs' "
                      f"lists them).{hint}")
