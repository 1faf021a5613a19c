"""The lab checks: the code under test and this folder on sys.path (for ppo, reward, checklib), and,
when `lab.py check` asks for it through the environment variable LAB_REPORT, one JSON line per check
in that file: its test id, outcome, docstring, and the exception that failed it. Without LAB_REPORT
(a plain pytest run) they are ordinary tests.

The code under test is the student copy named by the environment variable LAB_CODE (`lab.py check
DIR` sets it to DIR), else the repository these checks belong to. The checks themselves always come
from the grader's repository: `lab.py check` runs its own lab/checks, never the copy's, so editing
the copy's checks changes nothing."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

CODE = Path(os.environ.get("LAB_CODE") or Path(__file__).resolve().parents[2]).resolve()
sys.path.insert(0, str(CODE))  # ppo, reward: the student's (LAB_CODE) or this repository's
sys.path.insert(0, str(Path(__file__).resolve().parent))  # checklib, whatever pytest's import mode


def record(**row):
    path = os.environ.get("LAB_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when != "call" and not report.failed:  # setup and teardown matter only when they fail
        return
    error = ""
    message = ""
    if report.failed and call.excinfo is not None:
        error = call.excinfo.type.__name__
        lines = str(call.excinfo.value).strip().splitlines()
        # an assert's own message, without pytest's explanation below it
        message = lines[0] if lines else ""
    record(
        test=report.nodeid,
        outcome=report.outcome,
        doc=item.function.__doc__ or "",
        error=error,
        message=message,
    )


def pytest_collectreport(report):
    """A check file that does not import (a syntax error in ppo.py, say) fails all of its checks;
    the message is the error and where it is, "ppo.py line 254: SyntaxError: '(' was never closed".
    """
    if not report.failed:
        return
    lines = str(report.longrepr).splitlines()
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    where = ""
    # the deepest frame: "ppo.py:12: in <module>" lines, then a SyntaxError's File "..." line
    for line in lines:
        frame = re.match(r"(\S+\.py):(\d+): in ", line) or re.match(
            r'E\s+File "(.+)", line (\d+)', line
        )
        if frame:
            where = f"{Path(frame[1]).name} line {frame[2]}: "
    record(
        test=report.nodeid,
        outcome="failed",
        doc="",
        error="collection",
        message=where + (errors or ["?"])[-1],
    )
