#!/bin/sh
# Development certificates into certs/dev (CA, server for localhost/127.0.0.1/::1, one client per argument).
# For development and tests only; see certs/README.md.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-"$here/../.venv/bin/python"}
[ -x "$python" ] || python=python3
args=""
for name in "$@"; do args="$args --client $name"; done
# shellcheck disable=SC2086  # one word per client option, names are [A-Za-z0-9._-]
exec "$python" -m fhir_bridge certs dev --out "$here/dev" $args
