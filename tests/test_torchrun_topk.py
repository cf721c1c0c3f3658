"""Scale-out: 2-process torchrun (gloo) top-k mining gives exactly the single-process top-k ids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("torchrun_topk_script.py")


@pytest.mark.slow
def test_two_process_torchrun_equals_single_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not found next to the interpreter")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one.pt")], check=True, env=env, timeout=300)
    subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(SCRIPT), str(tmp_path / "two.pt")],
                   check=True, env=env, timeout=300)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for key in ("values", "image", "pos"):
        assert torch.equal(one[key], two[key]), key
