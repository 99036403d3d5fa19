"""Generated code is contained: run through the real scoring path (evalplus's untrusted_check in the
sandboxed worker), a solution that tries to read the parent's environment, write outside its directory or
reach a server on the host's loopback finds each one closed — by the sandbox, not by evalplus's guard, which
lets all three through."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from zoo.evaluation.problems import Problem, ProblemSet
from zoo.evaluation.scoring import bwrap_problem, score

PROBE = '''
def probe():
    import os, socket
    leaked = os.environ.get("ZOO_SANDBOX_CANARY")
    try:  # os.open, not open(): evalplus's guard breaks the latter, not the former
        os.write(os.open({outside!r}, os.O_WRONLY | os.O_CREAT, 0o644), b"escaped")
        wrote = True
    except OSError:
        wrote = False
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        connected = True
    except OSError:
        connected = False
    return leaked, wrote, connected
'''

CHECK = "def check(candidate):\n    assert candidate() == (None, False, False), candidate()\n"


@pytest.fixture
def host_server():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    server.close()


def _accept(server):
    try:
        return server.accept()[1]
    except OSError:
        return None


def problem_set(tmp_path, solution_body: str) -> tuple[ProblemSet, dict[str, str]]:
    task = Problem(task_id="Sandbox/0", prompt="", entry_point="probe", test=CHECK)
    path = tmp_path / "problems.jsonl"
    path.write_text("")
    problems = ProblemSet(dataset="humaneval", label="sandbox probe", version="0", tests="base", path=str(path),
                          md5="0", problems={task.task_id: task})
    return problems, {task.task_id: solution_body}


@pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")
def test_a_solution_cannot_read_the_environment_write_outside_or_connect(tmp_path, host_server, monkeypatch):
    port, accepted = host_server
    outside = tmp_path / "escaped.txt"
    monkeypatch.setenv("ZOO_SANDBOX_CANARY", "secret")
    problems, solutions = problem_set(tmp_path, PROBE.format(outside=str(outside), port=port))
    result = score(problems, solutions, progress=False)
    assert result["Sandbox/0"]["base_status"] == "pass", result
    assert not outside.exists()
    assert not [a for a in accepted if a is not None]


def test_the_probe_escapes_evalplus_guard_alone(tmp_path, host_server):
    # what the sandbox is for: under evalplus's reliability_guard alone (in a child, as evalplus runs it),
    # the probe reads the variable, writes the file and connects
    import subprocess
    import sys

    port, _ = host_server
    outside = tmp_path / "escaped.txt"
    code = ("from evalplus.eval.utils import reliability_guard\nreliability_guard(4 * 1024 ** 3)\n"
            + PROBE.format(outside=str(outside), port=port) + "\nprint(probe())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ZOO_SANDBOX_CANARY": "secret"})
    assert out.stdout.strip() == "('secret', True, True)", out.stderr
    assert outside.read_text() == "escaped"


def test_without_bwrap_scoring_warns_loudly_or_refuses(tmp_path, monkeypatch, caplog):
    import zoo.evaluation.scoring as scoring

    monkeypatch.setattr(scoring, "bwrap_problem", lambda: "bubblewrap is not installed (test)")
    monkeypatch.setenv("ZOO_REQUIRE_SANDBOX", "1")
    problems, solutions = problem_set(tmp_path, "def probe():\n    return (None, False, False)\n")
    from zoo.core.errors import ZooError

    with pytest.raises(ZooError, match="no sandbox for generated code"):
        score(problems, solutions, progress=False)
    monkeypatch.delenv("ZOO_REQUIRE_SANDBOX")
    with caplog.at_level("WARNING", logger="zoo.evaluation.scoring"):
        result = score(problems, solutions, progress=False)
    assert result["Sandbox/0"]["base_status"] == "pass"
    assert "WITHOUT a sandbox" in caplog.text
