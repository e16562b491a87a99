#!/usr/bin/env bash
# Set up a virtualenv for distlion: create it if needed, install torch only when it is
# missing, then distlion itself (editable) with the extras asked for.
#
#   bash launch/setup.sh                                 # extras: demo
#   bash launch/setup.sh test,accelerate,deepspeed,triton
#
# torch is installed (torch==2.13.0) only when the virtualenv has none: bring your own
# build first to keep it. Environment: DISTLION_VENV (default: .venv in the repository),
# PYTHON (the interpreter that creates it, default python3), TORCH_INDEX_URL (a pip index
# to take torch from, e.g. a CPU-only one; default: pip's configuration).
set -euo pipefail

extras="${1:-demo}"
case "$extras" in
  *[!a-z,_-]*|"") echo "setup.sh: extras must be a comma-separated list such as demo or test,accelerate; got '$extras'" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTLION_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"
torch_version="2.13.0"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup.sh: creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" >/dev/null 2>&1; then
  index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    index=(--index-url "$TORCH_INDEX_URL")  # e.g. PyTorch's CPU-only wheel index
  fi
  echo "setup.sh: installing torch==$torch_version"
  "$py" -m pip install --quiet ${index[@]+"${index[@]}"} "torch==$torch_version"
fi

echo "setup.sh: installing distlion[$extras] (editable)"
"$py" -m pip install --quiet -e "$repo[$extras]"
echo "setup.sh: ready: $py"
