"""Reading the files a finished run leaves in its folder (summary.json, config.yaml), with named errors.

The one reader of them for every command that looks into a run folder: the pipeline and the sweep
(is this run finished with this config? src/aikd/engine/pipeline.py) and the report
(src/aikd/report/runs.py). A damaged file, whatever is wrong with it (cut short, not JSON or YAML,
not a mapping, unreadable), is one error naming it and what to do, never a parser's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from aikd.config import TeacherConfig
from aikd.errors import AikdError


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json as a dict; AikdError naming the file if it is not one written by aikd."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, "run summary", err) from None
    if not isinstance(summary, dict):
        raise _damaged(path, "run summary", TypeError(f"it holds a {type(summary).__name__}, not a mapping"))
    return summary


def read_saved_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a dict ({} for an empty file); AikdError naming the file if it cannot be read."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise _damaged(path, "run config", err) from None
    if not isinstance(config, dict):
        raise _damaged(path, "run config", TypeError(f"it holds a {type(config).__name__}, not a mapping"))
    return config


def _damaged(path: Path, what: str, err: Exception) -> AikdError:
    reason = " ".join(str(err).split())[:200]  # a YAML error spans several lines: one line here
    return AikdError(f"'{path}' is not a {what} written by aikd ({type(err).__name__}: {reason}). "
                     f"Restore it, or remove the run folder '{path.parent}' to train that run again.")


def teacher_record(teacher: TeacherConfig, run_dir: Path) -> dict[str, Any]:
    """How a summary names the run's teacher: its path relative to the run folder (so a folder moved with its
    teacher still finds it, on any machine) and its content hash (what identifies it wherever it lies)."""
    if teacher.checkpoint is None:
        return {"teacher": None}
    path = os.path.relpath(Path(teacher.checkpoint).expanduser().resolve(), Path(run_dir).resolve())
    return {"teacher": Path(path).as_posix(), "teacher_sha256": teacher.sha256}


def teacher_path(summary: dict[str, Any], run_dir: Path) -> Path | None:
    """The teacher checkpoint a summary names: ``teacher``, relative to its run folder (an absolute one, as older
    summaries have, is taken as it is), else ``teacher_machine_path``, a path on the machine that ran it, kept
    where no copy of that teacher came with the folder (see scripts/portable_summaries.py)."""
    teacher = summary.get("teacher") or summary.get("teacher_machine_path")
    return None if not teacher else Path(run_dir) / teacher
