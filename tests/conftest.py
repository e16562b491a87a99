"""Put every test in exactly one tier, so that one ``-m`` expression picks a tier.

The tiers (registered in pyproject.toml), fastest first:

- ``fast``: in-process: layout, topology, the vote rule, the exchanges' arithmetic,
  kernels, argument checks. Nothing is launched and no training framework is imported.
  A test gets this tier by carrying no other: it is never written.
- ``slow``: in-process, but slow: the Triton kernels under Triton's interpreter on CPU.
- ``multiprocess``: starts processes of its own: gloo ranks through
  ``multiprocess.run_ranks``, or a Python subprocess; torch and distlion only.
- ``integration``: runs a training framework (Accelerate, DeepSpeed, Transformers,
  Lightning), in-process or launched, and the conformance suite of every integration.
- ``scripts``: runs a script of ``launch/`` or ``benchmarks/`` end to end, the way a
  user does (``python -m``, ``torchrun``).

A module whose tests share a tier says so once, ``pytestmark = pytest.mark.<tier>``
(on that line, so that ``-m fast`` can skip importing it, below); otherwise each test
outside ``fast`` carries its own mark. A test with two tier marks is a collection error.

    bash tests/run.sh -m fast                         # under 2 minutes on 2 cores
    bash tests/run.sh -m "not fast"                   # everything else
    bash tests/run.sh -m "fast or slow or multiprocess"  # torch and distlion only, no scripts
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TIERS = ("fast", "slow", "multiprocess", "integration", "scripts")
SLOW_IN_FAST_S = 10.0  # a fast-tier test slower than this is reported at the end of the run

_MODULE_TIER = re.compile(r"^pytestmark\s*=.*?\bpytest\.mark\.(" + "|".join(TIERS) + r")\b", re.MULTILINE)
_TIER_EXPRESSION = re.compile(r"[\sA-Za-z_()]*")


def _selects(expression: str, tier: str) -> bool:
    """Whether ``-m expression`` can select a test of ``tier``; True for expressions naming other marks."""
    words = set(re.findall(r"\w+", expression))
    if not _TIER_EXPRESSION.fullmatch(expression) or not words <= {*TIERS, "and", "or", "not"}:
        return True  # pytest decides, test by test
    return bool(eval(expression, {"__builtins__": {}}, {name: name == tier for name in TIERS}))  # noqa: S307


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing a module whose module-level tier the ``-m`` expression rules out (DeepSpeed,
    Lightning and Transformers take seconds to import)."""
    expression = config.getoption("markexpr")
    if not expression or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    match = _MODULE_TIER.search(collection_path.read_text())
    if match and not _selects(expression, match.group(1)):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(tiers)}: a test belongs to one tier "
                                    f"of {TIERS} (tests/conftest.py)")
        if not tiers:
            item.add_marker(pytest.mark.fast)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    slow = [report for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
            if report.when == "call" and "fast" in report.keywords and report.duration > SLOW_IN_FAST_S]
    if slow:
        terminalreporter.write_sep("=", f"fast-tier tests slower than {SLOW_IN_FAST_S:.0f} s: mark them "
                                        "multiprocess, integration or scripts (tests/conftest.py)")
        for report in sorted(slow, key=lambda r: -r.duration):
            terminalreporter.write_line(f"{report.duration:6.1f} s  {report.nodeid}")
