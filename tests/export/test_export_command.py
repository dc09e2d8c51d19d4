"""`edge-llm export` from the command line: a runtime-only install is told what to install before
anything is downloaded or written; flags that contradict the recipe fail as config errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_export_without_the_extra_says_what_to_install_and_writes_nothing(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "bundle"
    # A runtime-only install, simulated: torch and optimum cannot be imported in this interpreter.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['optimum'] = None\n"
        "from edge_llm.cli import main\n"
        f"sys.exit(main(['export', '--out', {str(out)!r}]))\n"
    )
    env = {**os.environ, "EDGE_LLM_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "edge-llm: export needs the export extra (missing: torch, optimum): pip install 'edge-llm[export]'"
    ]
    assert not out.exists() and not out.with_name("bundle.partial").exists()
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing downloaded, no stage folder


def test_export_flags_that_contradict_fail_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # qdq calibrates on text: without --calib-text (or a recipe's calib_text) it cannot start
    assert main(["export", "--quant", "qdq", "--out", str(tmp_path / "b")]) == 2
    assert "quantize.calib_text" in capsys.readouterr().err
    assert main(["export", "--static", "512", "--quant", "qdq", "--out", str(tmp_path / "b")]) == 2
    assert "--static '512': give PAST,PREFILL" in capsys.readouterr().err
    assert main(["export", "--static", "512,64", "--out", str(tmp_path / "b")]) == 2  # int8: fused ops
    assert "[static] fixes the shapes" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
