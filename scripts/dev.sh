#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (once), installs dfm with the extras the
# command needs, then runs it.  Usage: bash scripts/dev.sh run [dfm run args...] | test [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DFM_VENV:-.venv}
cmd=${1:-}
shift || true
need_extras=""
[ "$cmd" = "test" ] && need_extras="[test,peer,docs,eval]"
stamp="$venv/.dfm-installed${need_extras}"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch (peer extra) must be the CPU wheel: install it first, pinned, so nothing pulls CUDA builds.
  if [ -n "$need_extras" ]; then "$venv/bin/python" -m pip install -q "torch==2.13.0"; fi
  # constraints.txt pins every dependency's exact version: fresh clones compute with the same software.
  "$venv/bin/python" -m pip install -q -c constraints.txt -e ".${need_extras}"
  touch "$stamp"
fi
case "$cmd" in
  run)  exec "$venv/bin/dfm" run "$@" ;;
  test) exec "$venv/bin/python" -m pytest -n 2 --dist worksteal -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh run|test [args...]" >&2; exit 2 ;;
esac
