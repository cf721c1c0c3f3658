"""``sae-cafe view [PATH]``: start the Streamlit viewer on an artifact root or one run directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .data import MAX_UPLOAD_MB

APP = Path(__file__).parent / "streamlit_app.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    from sae_cafe.cli_help import HelpFormatter

    p = subparsers.add_parser("view", help="browse artifacts in the Streamlit viewer (latents, images, concept "
                              "graphs, metrics)", formatter_class=HelpFormatter,
                              description="Start the Streamlit viewer on an artifact root or one run directory. "
                                          "The command becomes the Streamlit server (same process id): stopping "
                                          "it (Ctrl-C, or kill PID) stops the server.")
    p.add_argument("path", nargs="?", default="indexes",
                   help="artifact root (lists its runs) or one run directory (default: ./indexes)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on")
    p.add_argument("--address", default="127.0.0.1", help="address to serve on; 0.0.0.0 exposes the viewer to "
                   "the network")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.set_defaults(func=_view)


def command(path: str | Path, port: int = 8501, address: str = "127.0.0.1", headless: bool = True) -> list[str]:
    """The ``streamlit run`` command line of the viewer (uploads capped at ``MAX_UPLOAD_MB``)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", address, "--server.headless", str(headless).lower(),
            "--server.maxUploadSize", str(MAX_UPLOAD_MB), "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",
            "--", "--root", str(Path(path).resolve())]


def _view(args) -> int:
    from sae_cafe.errors import ArtifactError

    from .data import resolve_root

    info = resolve_root(args.path)  # a clear error for a wrong PATH before the server starts
    if not info.runs:
        raise ArtifactError(f"{args.path}: no runs found (a run holds world/, acts/, saes/, cafe/, icat/ or "
                            "saliency/); build one first, e.g. `sae-cafe make-world --run demo`")
    cmd = command(args.path, args.port, args.address, args.headless)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child process: ``sae-cafe view``'s process id is the server's, so a signal to it (kill PID,
    # Ctrl-C, a supervisor stopping it) reaches Streamlit itself and leaves no orphaned server behind
    os.execv(cmd[0], cmd)
    return 0  # not reached
