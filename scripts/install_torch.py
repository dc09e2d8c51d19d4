"""Install torch for the export extra: the CPU build, unless asked for another.

    python scripts/install_torch.py "torch==2.13.0"      (run by scripts/setup.sh in .venv)

On Linux x86-64, PyPI's torch wheel depends on ~20 CUDA packages (nvidia-*, cuda-*, triton:
several GB) that the export pipeline never uses. So we first ask pip what it would install
(`pip install --dry-run --report`); when that includes CUDA packages we say so on one loud line
and install from PyTorch's CPU index instead. A machine whose index already offers a CPU wheel
(a local wheelhouse, macOS, aarch64) resolves without CUDA and installs as usual.

$EDGE_LLM_TORCH_INDEX chooses instead: a package index URL (a CUDA build, e.g.
https://download.pytorch.org/whl/cu130), or `default` for whatever the configured index gives.
Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ENV = "EDGE_LLM_TORCH_INDEX"
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")

Runner = Callable[[Sequence[str]], int]


def cuda_packages(report: dict[str, Any]) -> list[str]:
    """Names of the GPU runtime packages in a `pip install --report` document."""
    names = (item.get("metadata", {}).get("name", "") for item in report.get("install", []))
    return sorted(n for n in names if n.lower().startswith(CUDA_PREFIXES))


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *args]


def _run(cmd: Sequence[str]) -> int:
    return subprocess.call(list(cmd))


def install(spec: str, run: Runner = _run, env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    chosen = env.get(ENV, "").strip()
    if chosen:
        where = "the configured index" if chosen == "default" else chosen
        print(f"edge-llm setup: installing {spec} from {where} ({ENV})", file=sys.stderr)
        return run(pip("-q", spec) if chosen == "default" else pip("-q", "--index-url", chosen, spec))
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        # Only the wheels' metadata is fetched here, not the wheels.
        if run(pip("-q", "--dry-run", "--report", str(report_path), spec)) != 0 or not report_path.is_file():
            return run(pip("-q", spec))  # let pip itself say what is wrong
        cuda = cuda_packages(json.loads(report_path.read_text(encoding="utf-8")))
    if not cuda:
        return run(pip("-q", spec))
    print(
        f"edge-llm setup: {spec} from the package index would pull {len(cuda)} CUDA packages "
        f"({', '.join(cuda[:3])}, ...; several GB): installing the CPU build from {CPU_INDEX} instead "
        f"(for a CUDA build: {ENV}=https://download.pytorch.org/whl/cu130 or {ENV}=default)",
        file=sys.stderr,
    )
    code = run(pip("-q", "--index-url", CPU_INDEX, spec))
    if code != 0:
        print(
            f"edge-llm setup: could not install {spec} from {CPU_INDEX}; set {ENV} to an index "
            f"that has it, or {ENV}=default to accept the CUDA build",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(install(sys.argv[1]))
