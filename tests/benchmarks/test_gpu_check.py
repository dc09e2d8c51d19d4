"""benchmarks/gpu_check.sh on a machine without a GPU: it stops at once, before installing
anything, with exit 2 and a line saying why (the CUDA check itself needs a GPU machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def _run(path: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": path,
        "EDGE_LLM_CACHE": str(tmp_path / "cache"),
        "OUT": str(tmp_path / "out"),
    }
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_driver_it_stops_at_once(tmp_path: Path) -> None:
    res = _run(os.environ["PATH"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "no NVIDIA GPU here: nvidia-smi is not installed" in res.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing made


def test_with_a_driver_but_no_device_it_stops_at_once(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA-SMI has failed: no driver" >&2\nexit 9\n')
    smi.chmod(0o755)
    res = _run(f"{fake}{os.pathsep}{os.environ['PATH']}", tmp_path)
    assert res.returncode == 2, res.stderr
    assert "no NVIDIA GPU here: nvidia-smi found no device" in res.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
