#!/usr/bin/env bash
# Mutation testing of src/aikd/methods/ (losses, critic, schedules) against the fast method tests:
# mutmut changes one operator, constant or argument at a time and reruns the tests that cover it.
# A surviving mutant is a change no test noticed. Slow (about an hour on 2 cores), so it is not part
# of `make test`; the configuration (files, tests, deselected slow tests) is [tool.mutmut] in pyproject.toml.
#   make mutation            # or: JOBS=2 scripts/mutation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
rm -rf mutants
OMP_NUM_THREADS=1 "$BIN/mutmut" run --max-children "${JOBS:-2}" > /dev/null
"$BIN/mutmut" export-cicd-stats > /dev/null
"$BIN/python" - <<'PY'
import json
stats = json.load(open("mutants/mutmut-cicd-stats.json"))
tested = stats["total"] - stats.get("skipped", 0) - stats.get("not_checked", 0)
print(f"mutants: {stats['total']}, killed: {stats['killed']}, survived: {stats['survived']}, "
      f"timeouts: {stats.get('timeout', 0)}, no tests: {stats.get('no_tests', 0)}; "
      f"survival rate {100 * stats['survived'] / max(tested, 1):.1f} %")
PY
"$BIN/mutmut" results
