"""scripts/install_torch.py: the CPU build of torch unless the index already gives one (or the
user picks an index). pip is replaced by a recorder; the real resolution is checked by hand."""

from __future__ import annotations

import json
import runpy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.py"
mod = runpy.run_path(str(SCRIPT))
SPEC = "torch==2.13.0"
CU130 = "https://download.pytorch.org/whl/cu130"


def report(*names: str) -> dict[str, Any]:
    return {"install": [{"metadata": {"name": n, "version": "1"}} for n in names]}


def recorder(resolves_to: dict[str, Any]) -> tuple[list[list[str]], Any]:
    calls: list[list[str]] = []

    def run(cmd: Sequence[str]) -> int:
        calls.append(list(cmd))
        if "--dry-run" in cmd:
            Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps(resolves_to))
        return 0

    return calls, run


def test_cuda_resolution_switches_to_the_cpu_index(capsys: pytest.CaptureFixture) -> None:
    calls, run = recorder(report("torch", "nvidia-cublas", "cuda-toolkit", "triton", "sympy"))
    assert mod["install"](SPEC, run=run, env={}) == 0
    assert len(calls) == 2 and "--dry-run" in calls[0]
    assert calls[1][-3:] == ["--index-url", mod["CPU_INDEX"], SPEC]
    err = capsys.readouterr().err
    assert "would pull 3 CUDA packages" in err and "EDGE_LLM_TORCH_INDEX" in err
    assert len(err.splitlines()) == 1


def test_a_cpu_resolution_installs_as_configured() -> None:
    """This machine's path: the local wheelhouse offers the CPU wheel, so nothing changes."""
    calls, run = recorder(report("torch", "sympy", "filelock"))
    assert mod["install"](SPEC, run=run, env={}) == 0
    assert calls[1][-2:] == ["-q", SPEC] and "--index-url" not in calls[1]


@pytest.mark.parametrize(
    ("chosen", "tail"),
    [
        (CU130, ["--index-url", CU130, SPEC]),
        ("default", ["-q", SPEC]),
    ],
)
def test_the_user_can_choose_the_index(chosen: str, tail: list[str]) -> None:
    calls, run = recorder(report("torch", "nvidia-cublas"))
    assert mod["install"](SPEC, run=run, env={"EDGE_LLM_TORCH_INDEX": chosen}) == 0
    assert len(calls) == 1 and calls[0][-len(tail) :] == tail  # no dry run: the choice is made


def test_a_failed_cpu_install_says_how_to_choose(capsys: pytest.CaptureFixture) -> None:
    calls: list[list[str]] = []

    def run(cmd: Sequence[str]) -> int:
        calls.append(list(cmd))
        if "--dry-run" in cmd:
            Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps(report("torch", "nvidia-nccl-cu13")))
            return 0
        return 1

    assert mod["install"](SPEC, run=run, env={}) == 1
    assert "EDGE_LLM_TORCH_INDEX=default" in capsys.readouterr().err.splitlines()[-1]
