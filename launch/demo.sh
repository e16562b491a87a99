#!/usr/bin/env bash
# The demo from a fresh machine with only Python: set up .venv, then run `python -m launch.demo`.
#
#   bash launch/demo.sh                # DistLion vs AdamW + DDP, 4 CPU workers (a few minutes)
#   bash launch/demo.sh --data FILE    # any argument goes to launch.demo (see --help)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/launch/setup.sh" demo
cd "$repo"  # launch.demo is a module of the repository: relative paths (--data, --out) start here too
exec "${DISTLION_VENV:-$repo/.venv}/bin/python" -m launch.demo "$@"
