"""Rewrite the summaries under a results folder so that they name their teacher portably (issue 31).

A summary written before aikd kept relative paths names its teacher by an absolute path of the machine that
ran it (``/work/results/table/superior/<entry>/checkpoints/last.safetensors``). Where that sweep's folder
(``table``) lies above the run here with the entry in it, the path becomes relative to the run folder,
as aikd now writes it (src/aikd/run_files.py); where none does, it moves to ``teacher_machine_path``, marked as
that machine's (an entry of the same name in another sweep's folder is another training of that model,
not this teacher). Every other byte of the summary, and so every report number, stays as it was.

    python scripts/portable_summaries.py results
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from aikd.fileio import atomic_write_bytes


def portable(summary: dict, run_dir: Path, top: Path) -> dict | None:
    """The summary with its teacher named portably, or None if it needs no change."""
    teacher = summary.get("teacher")
    if not teacher or not Path(teacher).is_absolute():
        return None
    parts = Path(teacher).parts
    if "superior" not in parts:
        return _rename(summary, "teacher", None, teacher)
    at = parts.index("superior")
    tail, sweep = Path(*parts[at:]), parts[at - 1]  # superior/<entry>/checkpoints/<file>, and the sweep's folder
    for folder in [run_dir, *run_dir.parents]:
        if folder.name == sweep and (folder / tail.parent.parent).is_dir():  # that sweep's own entry, not a twin
            return _rename(summary, "teacher", os.path.relpath(folder / tail, run_dir), None)
        if folder == top:
            break
    return _rename(summary, "teacher", None, teacher)


def _rename(summary: dict, key: str, relative: str | None, machine: str | None) -> dict:
    """``summary`` with ``teacher`` replaced in place (the keys keep their order), ``teacher_machine_path`` after."""
    out = {}
    for k, v in summary.items():
        out[k] = relative if k == key else v
        if k == key and machine is not None:
            out["teacher_machine_path"] = machine
    return out


def main(top: Path) -> int:
    changed = 0
    for path in sorted(top.rglob("summary.json")):
        text = path.read_text()
        new = portable(json.loads(text), path.parent, top)
        if new is not None:
            atomic_write_bytes(path, (json.dumps(new, indent=2) + ("\n" if text.endswith("\n") else "")).encode())
            changed += 1
    print(f"portable_summaries: {changed} summaries rewritten under {top}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results")))
