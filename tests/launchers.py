"""Launch a job under a real launcher (torchrun, accelerate launch) on CPU, bounded by a timeout.

A job runs in a session of its own, so a timeout kills the launcher and every worker it
started, and the test fails instead of stalling CI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int) -> list[str]:
    """Return ``torchrun --nproc_per_node nproc`` of this interpreter on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port())]


def accelerate_command() -> list[str]:
    """Return the ``accelerate launch`` of this interpreter's environment (never one from PATH)."""
    entry_point = Path(sys.executable).with_name("accelerate")
    if entry_point.exists():
        return [str(entry_point), "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch"]


def run_bounded(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; fail the test if it has not finished within ``timeout`` s."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command[0]} did not finish within {timeout:.0f} s (hang?): {' '.join(command)}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
