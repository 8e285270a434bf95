#!/usr/bin/env bash
# vitjax on a fresh Debian/Ubuntu machine, in one command each:
#   bash run.sh main [ARGS...]   install, then run the main job (vitjax survey)
#   bash run.sh test [ARGS...]   install, then run the whole test suite
# Idempotent: a second run reuses the virtual environment (.venv) and the
# dataset package; it reinstalls only when pyproject.toml or constraints.txt
# changed. Needs python3 >= 3.10 with venv; installs the Debian package
# dataset-fashion-mnist with apt-get when the files are missing.
set -euo pipefail
cd "$(dirname "$0")"

usage() { echo "usage: bash run.sh main|test [ARGS...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
mode=$1; shift

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "run.sh: $python is older than 3.10" >&2; exit 1; }

install_python() {
  # $1: the extras this mode needs ("" for the main job, which needs no torch).
  # The stamp records the dependency files' hash and the extras installed; a
  # mode whose extras are already there (the tests' are a superset of the
  # main job's) reuses the environment.
  local extras=$1 stamp=.venv/.vitjax-install-stamp
  local want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
  fi
  local have_hash="" have_extras=""
  read -r have_hash have_extras 2>/dev/null < "$stamp" || true
  if [ "$have_hash" = "$want" ] && { [ -z "$extras" ] || [ "$have_extras" = "$extras" ]; }; then
    return 0
  fi
  echo "run.sh: installing vitjax${extras:+[$extras]} and its pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".${extras:+[$extras]}"
  echo "$want $extras" > "$stamp"
}

fashion_present() {
  .venv/bin/python -c 'from vitjax import data; data.find_fashion_dir(None)' 2>/dev/null
}

install_dataset() {
  fashion_present && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; fi
  fi
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "run.sh: installing the Debian package dataset-fashion-mnist" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  fashion_present || {
    echo "run.sh: Fashion-MNIST is missing and could not be installed: run" \
         "'sudo apt-get install dataset-fashion-mnist', or set VITJAX_DATA_DIR" \
         "to a directory holding the four original .gz files" >&2
    return 1; }
}

case "$mode" in
  main)
    install_python ""
    install_dataset
    exec .venv/bin/vitjax survey "$@"
    ;;
  test)
    install_python "test,interop"
    install_dataset
    # pytest exits 5 when it collects no test; that is a failure here too.
    # Two worker processes, one test module each at a time: XLA compiles on a
    # single thread, so two processes keep both cores busy (19.3 -> 16.0 min
    # on the 2-core EPYC). VITJAX_TEST_WORKERS=0 runs in this process.
    exec .venv/bin/python -m pytest -n "${VITJAX_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *) usage ;;
esac
