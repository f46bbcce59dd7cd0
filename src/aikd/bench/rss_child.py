"""The fresh process whose peak memory :func:`aikd.bench.memory.peak_rss_mib` reads.

``python -m aikd.bench.rss_child SETTING_JSON METHOD`` trains two short epochs of METHOD and prints the
process's peak resident memory in KiB. Nothing imports this module, so ``-m`` runs it cleanly.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from aikd.bench.steps import Setting, train_briefly


def peak_rss_kib() -> int:
    """This process's own peak resident memory in KiB.

    Linux's VmHWM belongs to the address space, which ``exec`` makes anew. ``ru_maxrss`` is not a substitute
    there: it survives ``exec`` and starts from the forking parent's size, so a child started by a large
    parent reports the parent's peak whenever its own is smaller. It is used only where /proc is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(setting_json: str, method: str) -> None:
    train_briefly(Setting(**json.loads(setting_json)), method)
    print(peak_rss_kib())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
