"""A finished DistLion job exits 0 with no exit_worker(): real torchrun and accelerate launches.

The workers (benchmarks/clean_exit.py) train a few steps and return from the script. The
abort this guards against ("terminate called without an active exception", exit -6, when
gloo's worker thread frees a DistLion work during the interpreter's teardown;
distlion/comm/flat.py) is a rare race, so the launches preload the benchmark's shim that
delays gloo's threads, which makes every launch of the unfixed library abort (the control
below). Without a C compiler the launches run as they are. ``python -m benchmarks.clean_exit``
is the long study (20 launches per launcher).
"""

import pytest

from benchmarks import clean_exit

pytestmark = pytest.mark.scripts

LIMIT = 120  # seconds per launch; a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return clean_exit.build_shim(str(tmp_path_factory.mktemp("shim")))


def assert_clean(result: dict) -> None:
    assert not result["hung"], f"{result['launcher']} launch hung:\n{result['tail']}"
    assert result["returncode"] == 0 and not result["aborted"], (
        f"{result['launcher']} launch exited {result['returncode']}:\n{result['tail']}")
    assert result["trained"], result["tail"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("timeout_s", [None, 30.0], ids=["no_timeout", "timeout"])
def test_torchrun_job_exits_0(shim, timeout_s):
    assert_clean(clean_exit.launch("torchrun", shim=shim, timeout_s=timeout_s, limit=LIMIT))


@pytest.mark.timeout(150)
def test_accelerate_job_exits_0(shim):
    pytest.importorskip("accelerate")
    assert_clean(clean_exit.launch("accelerate", shim=shim, limit=LIMIT))


@pytest.mark.timeout(150)
def test_control_the_shim_reproduces_the_abort_without_the_fix(shim):
    """With DistLion's handle retention off, the same amplified job dies in the teardown."""
    if shim is None:
        pytest.skip("no C compiler to build the shim")
    result = clean_exit.launch("torchrun", shim=shim, unfixed=True, limit=LIMIT)
    assert result["trained"] and result["aborted"] and result["returncode"] != 0, result["tail"]
