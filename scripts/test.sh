#!/usr/bin/env bash
# make test's pytest runs. With WORKERS > 1: first the tests that may share the machine
# (tests/conftest.py: CONCURRENT's modules, and the tests marked concurrent) on WORKERS
# processes at once, then every other test alone, one at a time, as their timings need. Both
# runs share the small models the tests train (VAE_TEST_SHARED, removed at the end), and the
# second runs whatever the first's result:
# the exit status is the first run's failure, if any. With WORKERS 1, one run of everything.
# Usage: scripts/test.sh PYTHON WORKERS [PYTEST ARGS...] (the args go to both runs)
set -u
python=$1 workers=$2
shift 2
shared=$(mktemp -d "${TMPDIR:-/tmp}/vae-tests.XXXXXX")
trap 'rm -rf "$shared"' EXIT
export VAE_TEST_SHARED=$shared
status=0 selected=0
run() {
  "$python" -m pytest "$@"
  local rc=$?
  # 5: this run selected no test (PYTEST_ARGS may select tests of one run only).
  if [ $rc -eq 5 ]; then return; fi
  selected=1
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
if [ "$workers" -gt 1 ]; then
  run --only concurrent -n "$workers" --dist loadfile "$@"
  run --only alone "$@"
else
  run "$@"
fi
[ $selected -eq 1 ] || exit 5
exit $status
