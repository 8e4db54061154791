#!/usr/bin/env bash
# Debian packages the tests use, installed where missing (make test and .ci/run call this):
# - prometheus (the server and promtool): tests/test_monitoring.py runs a real one;
# - dataset-fashion-mnist: the out-of-distribution set of the evaluation tests.
# Without apt-get or root, it says what is missing and goes on: those tests skip, except in
# CI, where they fail.
set -u
need=()
{ command -v prometheus && command -v promtool; } >/dev/null || need+=(prometheus)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "system-packages: missing ${need[*]} (install them with apt-get as root)" >&2
  exit 0
fi
# A policy-rc.d keeps apt from starting the packaged Prometheus daemon.
policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
echo "system-packages: installing ${need[*]}"
(apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}") >/dev/null \
  || echo "system-packages: could not install ${need[*]}" >&2
[ -n "$made_policy" ] && rm -f "$policy"
exit 0
