#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash dev.sh demo   set everything up, then run the demo
#   bash dev.sh test   set everything up, then run the whole test suite (ruff, mypy, import contracts, pytest)
#   bash dev.sh setup  only set up
#   bash dev.sh bench  set everything up (plus wrk and the bench extra), then run the benchmarks (BENCHMARKS.md);
#                      options go to `python -m bench`: parts (pull memory api audit sync), --quick
# Set-up: a virtualenv in .venv with the project and its dev dependencies, and the system packages
# redis-server (and for the tests poppler-utils and chromium), installed with apt-get when missing and we are
# root; otherwise one line says what to install.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"

need_system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  if [ "${1:-}" = "test" ]; then   # only the tests need these
    command -v pdftoppm >/dev/null 2>&1 || missing+=(poppler-utils)
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)   # the auditor page's browser test
  fi
  if [ "${1:-}" = "bench" ] && ! command -v wrk >/dev/null 2>&1; then   # optional: the API part has a fallback
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "dev.sh: installing wrk with apt-get" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null \
        || echo "dev.sh: apt-get could not install wrk; the API benchmark uses its Python load generator" >&2
    else
      echo "dev.sh: wrk not found (apt-get install wrk); the API benchmark uses its Python load generator" >&2
    fi
  fi
  if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: installing ${missing[*]} with apt-get" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
      || { echo "dev.sh: apt-get could not install ${missing[*]}; install them and run again" >&2; exit 1; }
  else
    echo "dev.sh: please install ${missing[*]} (e.g. sudo apt-get install ${missing[*]}) and run again" >&2
    exit 1
  fi
}

setup() {
  need_system_packages "${1:-}"
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "dev.sh: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
    "$PYTHON" -m venv .venv
  fi
  local stamp=.venv/.installed extras=dev
  if [ "${1:-}" = "bench" ]; then stamp=.venv/.installed-bench; extras=dev,bench; fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo)
    setup
    shift
    exec .venv/bin/fhir-bridge demo "$@"
    ;;
  test)
    setup test
    shift
    .venv/bin/ruff check .
    .venv/bin/mypy
    .venv/bin/lint-imports
    set +e
    .venv/bin/pytest -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "dev.sh: pytest collected no tests: that is a failure" >&2; exit 1; fi
    exit "$rc"
    ;;
  bench)
    setup bench
    shift
    exec .venv/bin/python -m bench "$@"
    ;;
  *)
    echo "usage: bash dev.sh demo | test [pytest args] | bench [parts] [--quick] | setup" >&2
    exit 2
    ;;
esac
