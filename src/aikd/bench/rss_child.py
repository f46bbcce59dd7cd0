"""The fresh process whose peak memory :func:`aikd.bench.memory.peak_rss_mib` reads.

``python -m aikd.bench.rss_child SETTING_JSON METHOD`` trains two short epochs of METHOD and prints the
process's peak resident memory in KiB. Nothing imports this module, so ``-m`` runs it cleanly.
"""

from __future__ import annotations

import json
import resource
import sys

from aikd.bench.steps import Setting, train_briefly


def main(setting_json: str, method: str) -> None:
    train_briefly(Setting(**json.loads(setting_json)), method)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
