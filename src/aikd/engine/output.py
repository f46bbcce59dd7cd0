"""Run-wide settings, each one small object handed down whole: where a run's words go, and what names it.

:class:`Output` is what ``--quiet`` and a pipeline's messages used to be as two loose arguments (a flag and an
untyped function) passed through every layer from the CLI to the evaluator; :class:`RunIdentity` is how the
run is known in its summary, its reliability diagram and its tracker (the recipe, the config's name, and the
seed). A leaf module: the engine's parts and the CLI import it, it imports nothing of aikd.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from aikd.config import RunConfig


def _say_nothing(message: str) -> None:
    """The log of a silent output."""


def to_stderr(message: str) -> None:
    """A log that writes each message to stderr at once (stdout stays for a command's results)."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Output:
    """Where a run's words go.

    ``quiet``: no progress bars and no epoch lines (``--quiet``); ``log``: the messages of pipelines and sweeps
    (phase 1 starts, a finished run is reused, a cache entry is waited for). Progress bars appear only on a
    terminal (:meth:`bar`). The library's default log is ``print``; the CLI's writes to stderr.
    """

    quiet: bool = False
    log: Callable[[str], None] = print

    @classmethod
    def on_stderr(cls, quiet: bool = False) -> Output:
        """The command line's output: messages on stderr, or nothing at all with ``--quiet``."""
        return SILENT if quiet else cls(log=to_stderr)

    def with_(self, *, quiet: bool | None = None, log: Callable[[str], None] | None = None) -> Output:
        """This output with the settings given (not None) replaced: the library entry points' own keywords."""
        changes = {k: v for k, v in (("quiet", quiet), ("log", log)) if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def for_rank(self, is_main: bool) -> Output:
        """One voice per run: this output on rank 0, :data:`SILENT` on the other ranks of a distributed run."""
        return self if is_main else SILENT

    @property
    def shows_progress(self) -> bool:
        return not self.quiet and sys.stderr.isatty()

    def bar(self, total: int, description: str, leave: bool = False) -> tqdm:
        """A tqdm bar on stderr; silent when quiet or when stderr is not a terminal."""
        return tqdm(total=total, desc=description, leave=leave, disable=not self.shows_progress,
                    dynamic_ncols=True, file=sys.stderr)


SILENT = Output(quiet=True, log=_say_nothing)


@dataclass(frozen=True)
class RunIdentity:
    """What a run is called in reports and trackers: its recipe (the row label: the config's name, by default
    the method) and its seed."""

    recipe: str
    seed: int

    @classmethod
    def of(cls, cfg: RunConfig, recipe: str | None = None) -> RunIdentity:
        return cls(recipe or cfg.method, cfg.seed)
