"""``sae-cafe view`` as a real process: killing it by its PID leaves no Streamlit server behind."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from app.browser import viewer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc to list processes")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_view_by_pid_stops_the_server(tmp_path, sig):
    root = tmp_path / f"viewroot_{sig.name}"
    (root / "r" / "world").mkdir(parents=True)  # a run directory (empty stages are fine for the server)
    port = free_port()
    try:
        with viewer(root, tmp_path / "view.log", cli=True, port=port) as server:  # the user's `sae-cafe view`
            assert processes_mentioning(str(root))  # the server runs (as the very process we started)
            os.kill(server.proc.pid, sig)
            server.proc.wait(timeout=60)
            deadline = time.time() + 30
            while (port_open(port) or processes_mentioning(str(root))) and time.time() < deadline:
                time.sleep(0.5)
            assert not port_open(port), "the Streamlit server still serves after `sae-cafe view` was killed"
            assert not processes_mentioning(str(root)), "a Streamlit process outlived `sae-cafe view`"
    finally:
        for pid in processes_mentioning(str(root)):  # only processes of this test's unique root
            os.kill(pid, signal.SIGKILL)
