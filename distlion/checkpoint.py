"""Per-rank optimizer state files, now in ``distlion.integrations.common`` (``distlion.save`` and ``distlion.load``:
``distlion.integrations.torchrun``); this module keeps existing imports working."""

from distlion.integrations.common import (STATE_FILE, STATE_FILE_PATTERN, TOPOLOGY_FIELDS, StateFile,  # noqa: F401
                                          describe_mismatch, fail_together, failed_ranks, find_state_files,
                                          load_file, load_state, save_state, state_file_name, topology)
from distlion.integrations.torchrun import load, save  # noqa: F401
