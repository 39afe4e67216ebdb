#!/usr/bin/env bash
# Make .venv with the package installed (not editable: this also proves packaging works).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  bash scripts/debian-deps.sh python3 python3-venv python3-pip
  py=python3
fi
stamp=.venv/.installed
inputs=$(find setup.cfg pyproject.toml ecr_twisted twisted/plugins -name '*.py' -o -name '*.cfg' -o -name '*.toml' -o -name 'py.typed' | sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
quiet() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }  # this machine's pip.conf names absent mirrors
quiet .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
quiet .venv/bin/pip install -q --disable-pip-version-check ".[test]"
# build Twisted's plugin cache now, so twistd finds ecrproxy and never tries to write it later
.venv/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
help=$(.venv/bin/twistd --help)  # whole output first: grep -q closing the pipe early made twistd die of EPIPE
grep -q ecrproxy <<<"$help"
echo "$inputs" > "$stamp"
