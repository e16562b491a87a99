"""DistLion's checkpoints: crash-safe per-rank files with a manifest (``files``), resume on another
topology (``elastic``, ``resume``) and the offline tool (``python -m distlion.checkpoint``).

``distlion.save`` and ``distlion.load`` (``distlion.integrations.torchrun``) are the entry points
for scripts; each integration calls ``distlion.integrations.common.save_state`` /
``load_state``, which use this package. Names that lived here before stay importable.
"""

from importlib import import_module
from typing import Any

_MOVED = {name: "distlion.integrations.common" for name in (
    "TOPOLOGY_FIELDS", "describe_mismatch", "fail_together", "failed_ranks", "load_file", "load_state",
    "save_state", "topology")}
_MOVED |= {name: "distlion.checkpoint.files" for name in (
    "STATE_FILE", "STATE_FILE_PATTERN", "StateFile", "find_state_files", "state_file_name", "Manifest",
    "CheckpointError")}
_MOVED |= {"load": "distlion.integrations.torchrun", "save": "distlion.integrations.torchrun"}


def __getattr__(name: str) -> Any:  # imported on first use: distlion.options imports this package's rules
    if name in _MOVED:
        return getattr(import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'distlion.checkpoint' has no attribute {name!r}")
