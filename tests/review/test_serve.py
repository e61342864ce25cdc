"""``curate review --serve``: the command prints its URL and serves the page; a second server
on the same run, a taken port and conflicting options are one line, exit 2, no traceback."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from curate.cli.main import app

runner = CliRunner()


def _start(run) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "curate.cli.main",
            "review",
            "--run",
            str(run),
            "--serve",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("no URL printed: " + "".join(seen))


def test_serve_prints_its_url_and_refuses_a_second_server(review_copy):
    run, ids = review_copy
    proc, url = _start(run.path)
    try:
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and ids["flagged"][0] in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]
        second = runner.invoke(app, ["review", "--run", str(run.path), "--serve", "--port", "0"])
        assert second.exit_code == 2 and second.output.startswith("error:")
        assert "a review server already works on" in second.output
        assert f"pid {proc.pid}" in second.output and "Traceback" not in second.output
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "server stopped" in out and "Traceback" not in out


def test_serve_refuses_a_taken_port_and_conflicting_options(review_copy):
    run, ids = review_copy
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = runner.invoke(app, ["review", "--run", str(run.path), "--serve", "--port", str(port)])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output
    assert "--port" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["review", "--run", str(run.path), "--serve", "--sample", ids["zero"][0], "--keep"]
    )
    assert r.exit_code == 2 and "--serve starts the web app" in r.output
