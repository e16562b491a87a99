#!/usr/bin/env bash
# Set up .venv with everything the tests need, then run the whole suite.
#
#   bash tests/run.sh                 # all tests
#   bash tests/run.sh -k distributed  # arguments go to pytest
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/launch/setup.sh" test,accelerate,deepspeed,triton,transformers,lightning,torchft
cd "$repo"
exec "${DISTLION_VENV:-$repo/.venv}/bin/python" -m pytest -q "$@"
