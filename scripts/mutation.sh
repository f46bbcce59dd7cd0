#!/usr/bin/env bash
# Mutation testing of the module-level functions of src/aikd/methods/ (the losses, the critic's loss,
# penalty and step, the schedules, the samplers; not the classes' glue) against the fast method tests:
# mutmut changes one operator, constant or argument at a time and reruns the tests that cover it.
# A surviving mutant is a change no test noticed. Slow (about 25 minutes on one core), so it is not part
# of `make test`; the configuration (files, tests, deselected slow tests) is [tool.mutmut] in pyproject.toml.
# Results and the explanation of every survivor: docs/results/mutation.md.
#   make mutation            # or: JOBS=2 scripts/mutation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
rm -rf mutants
OMP_NUM_THREADS=1 "$BIN/mutmut" run --max-children "${JOBS:-2}" "aikd.methods.*.x_*" > /dev/null
# Every mutant's status ("name: killed|survived|no tests|timeout|not checked"); not checked = outside the glob.
"$BIN/mutmut" results --all true | "$BIN/python" -c '
import collections, sys
status = collections.Counter(line.rsplit(": ", 1)[1].strip() for line in sys.stdin if ": " in line)
tested = sum(n for s, n in status.items() if s not in ("not checked", "skipped"))
rate = 100 * status["survived"] / max(tested, 1)
counts = ", ".join(f"{s}: {n}" for s, n in sorted(status.items()) if s != "not checked")
print(f"mutants tested: {tested}; {counts}; survival rate {rate:.1f} %")
'
"$BIN/mutmut" results
