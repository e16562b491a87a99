#!/usr/bin/env bash
# The demo from a fresh machine with only Python: set up .venv, then run launch/demo.py.
#
#   bash launch/demo.sh                # DistLion vs AdamW + DDP, 4 CPU workers (a few minutes)
#   bash launch/demo.sh --data FILE    # any argument goes to launch/demo.py (see --help)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/launch/setup.sh" demo
exec "${DISTLION_VENV:-$repo/.venv}/bin/python" "$repo/launch/demo.py" "$@"
