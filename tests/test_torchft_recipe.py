"""launch/torchft/local.sh end to end: torchft's Lighthouse and 3 replica groups train a few steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torchft", reason="torchft is not installed: pip install 'distlion[torchft]'")
pytestmark = pytest.mark.scripts
from benchmarks import harness  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def test_the_local_recipe_trains_three_groups_that_vote_together():
    env = {**os.environ, "LIGHTHOUSE_PORT": str(harness.free_port()), "MASTER_PORT_BASE": str(harness.free_port()),
           "DISTLION_VENV": sys.prefix}  # this interpreter's virtualenv
    result = subprocess.run(["bash", "launch/torchft/local.sh", "--steps", "6", "--log_every", "5"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = re.findall(r"group (\d) step 5: loss ([\d.]+), (\d) voters", result.stdout)
    assert sorted(group for group, _, _ in lines) == ["0", "1", "2"], result.stdout[-2000:]
    assert {voters for _, _, voters in lines} == {"3"}
    assert len({loss for _, loss, _ in lines}) == 3  # each group its own data, one shared model
