"""``app.browser`` (the shared "start the viewer, wait for its health endpoint, drive headless Chromium" helper):
what is missing is named, a server that answers its health endpoint is served and stopped, one that exits or
never answers is a clear error with its log. No browser needed (the browser tests use the helper for real)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from app import browser as br

HEALTH_SERVER = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/_stcore/health"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"no")

        def log_message(self, *a):
            pass

    print("serving", flush=True)
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_missing_browser_pieces_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(br, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(br, "DRIVER", tmp_path / "no-chromedriver")
    why = br.unavailable()
    assert "apt-get install chromium)" in why and "apt-get install chromium-driver" in why
    assert "never a downloaded browser" in why
    with pytest.raises(br.BrowserUnavailable, match="no-chromedriver"):
        br.require()
    with pytest.raises(br.BrowserUnavailable, match="no-chromium"):
        br.chromium(tmp_path / "profile")  # refused before Selenium is asked for anything
    real = br.importlib.util.find_spec
    monkeypatch.setattr(br.importlib.util, "find_spec", lambda n: None if n == "streamlit" else real(n))
    assert "pip install streamlit" in br.unavailable()
    assert "streamlit" not in br.unavailable(streamlit=False)
    with pytest.raises(br.BrowserUnavailable, match="pip install streamlit"), br.viewer(tmp_path, tmp_path / "l"):
        pass


def test_serve_waits_for_health_and_stops_the_server(tmp_path):
    import urllib.request

    script = tmp_path / "health.py"
    script.write_text(HEALTH_SERVER)
    port = br.free_port()
    with br.serve([sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}", tmp_path / "s.log",
                  timeout=60, cwd=tmp_path) as s:
        assert s.url == f"http://127.0.0.1:{port}" and s.proc.poll() is None
        assert urllib.request.urlopen(f"{s.url}/_stcore/health", timeout=5).read() == b"ok"
    assert s.proc.poll() is not None  # stopped on exit
    assert "serving" in (tmp_path / "s.log").read_text()


def test_server_that_exits_or_never_answers_is_a_clear_error(tmp_path):
    port = br.free_port()
    crash = [sys.executable, "-c", "import sys; print('no such run: xyz'); sys.exit(3)"]
    with (pytest.raises(br.ViewerStartError, match=r"(?s)exit 3.*no such run: xyz"),
          br.serve(crash, f"http://127.0.0.1:{port}", tmp_path / "a.log", timeout=60)):
        pass
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with (pytest.raises(br.ViewerStartError, match="no answer within 2 s") as e,
          br.serve(silent, f"http://127.0.0.1:{port}", tmp_path / "b.log", timeout=2, grace=5)):
        pass
    assert isinstance(e.value, br.SaeCafeError)


def test_viewer_command_lines():
    from app.cli import command

    assert br.viewer_command("runs", 8600) == command("runs", port=8600)
    cli = br.viewer_command("runs/r", 8600, cli=True)
    assert cli[1:] == ["-m", "sae_cafe", "view", "runs/r", "--port", "8600", "--headless"]
