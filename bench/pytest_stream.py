"""pytest plugin for GPU runs that a time limit may cut: every test's outcome and duration, and a failure's
full report, are appended to $SALA_TEST_STREAM as soon as the test ends (pytest prints failures only at the end).

    PYTHONPATH=bench:src SALA_TEST_STREAM=$OUT/stream.log python -m pytest -p pytest_stream tests/...
"""

from __future__ import annotations

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("SALA_TEST_STREAM")
    if not path or (report.when != "call" and not report.failed and not report.skipped):
        return
    with open(path, "a") as f:
        f.write(f"{report.outcome.upper():7s} {report.duration:7.1f}s {report.nodeid} ({report.when})\n")
        if report.failed:
            f.write(report.longreprtext + "\n\n")
