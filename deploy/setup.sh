#!/usr/bin/env bash
# The two set-up commands of the README:
#   deploy/setup.sh demo   install everything into ./.venv and run the node on embedded defaults as a demo
#   deploy/setup.sh test   install the test dependencies (Debian packages and the sam2 extra included) and run the
#                          test suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

venv() {
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml (they lie on the build machines' disk).
    .venv/bin/python -m pip install -q -e ".$1"
}

sam2_extra() {
    # The optional SAM2 engine, which the tests cover. sam2 1.1.0 is a source release whose build imports torch
    # and tries to compile a CUDA extension: build it against the venv's pinned torch (an isolated build would
    # fetch another torch) and without the extension (SAM2 runs without it), then install the extra's other
    # dependencies.
    .venv/bin/python -m pip install -q "setuptools>=69" wheel
    SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation --no-deps "sam2==1.1.0"
    .venv/bin/python -m pip install -q -e ".[$1]"
}

debian_packages() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local wanted=(dcmtk orthanc dicom3tools plastimatch dcm2niix)
    local missing=()
    for p in "${wanted[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    # a PostgreSQL server for the tests that run the node on it (some images ship one in /usr/local/bin)
    command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    if [ ${#missing[@]} -gt 0 ]; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

case "${1:-}" in
    demo)
        venv ""
        exec .venv/bin/dicom-node demo
        ;;
    test)
        debian_packages
        venv "[test]"
        sam2_extra "test,sam2"
        shift
        exec .venv/bin/python -m pytest "$@"
        ;;
    *)
        echo "usage: deploy/setup.sh demo|test [pytest args]" >&2
        exit 2
        ;;
esac
