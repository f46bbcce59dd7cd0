"""User-facing errors.

Anything a user can cause (a wrong path, key, value or file) raises
:class:`AikdError`. The command line prints its message as one paragraph and
exits non-zero without a traceback; library users can catch it.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class AikdError(Exception):
    """A problem with the user's input, explained well enough to fix it."""


class ConfigError(AikdError):
    """A config file or override that does not fit the schema."""


class DataError(AikdError):
    """A dataset that is missing, incomplete or malformed."""


class CheckpointError(AikdError):
    """A checkpoint that cannot be loaded, or does not fit the run."""


class DiskFullError(AikdError):
    """A write that found no space left on its device (or its quota); the file it replaces is unchanged."""


class RenamedKeyWarning(FutureWarning):
    """A config key read under a name it had before a rename; the message names the new one."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class RunInterrupted(AikdError):
    """A run stopped by a signal after saving a checkpoint; ``exit_code`` follows the shell's 128 + N."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# How a message tells the user to continue a run: `aikd train` continues with --resume; the commands that
# train several runs (pipeline, demo, sweep) continue their unfinished runs when run again.
RESUME_TRAIN = "the same command plus --resume (or --resume auto)"
RESUME_RERUN = "the same command again (it continues the unfinished run from its last checkpoint)"


def for_rerun(err: AikdError) -> AikdError:
    """``err`` with its advice to continue the run rewritten for a command that resumes by itself."""
    text = str(err).replace(RESUME_TRAIN, RESUME_RERUN)
    if isinstance(err, RunInterrupted):
        return RunInterrupted(text, err.exit_code - 128)
    return type(err)(text)


def exit_code(err: AikdError) -> int:
    """Print ``err`` as the one line a command ends with (stderr); the process's exit code: 128 + N for a run
    stopped by signal N (it saved a checkpoint), else 2."""
    if isinstance(err, RunInterrupted):
        print(f"aikd: {err}", file=sys.stderr)
        return err.exit_code
    print(f"aikd: error: {err}", file=sys.stderr)
    return 2
