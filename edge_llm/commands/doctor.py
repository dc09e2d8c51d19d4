"""`edge-llm doctor`: what this board offers — CPU features, memory, onnxruntime and providers —
and what is installed: edge-llm's version, its cache folder and which extras are present."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

_FLAGS = (
    "avx",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "fma",
    "f16c",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show CPU features, memory, onnxruntime version and providers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # The memory plan section (edge_llm.memory): needs a bundle; the profile and budget are optional.
    p.add_argument("--bundle", help="also print the memory plan for this bundle")
    p.add_argument("--config", help="board profile TOML for the memory plan")
    p.add_argument("--memory-mb", type=int, metavar="MB", help="budget (default: [runtime] memory_mb)")
    p.set_defaults(handler=run)


def facts() -> dict[str, Any]:
    import numpy
    import onnxruntime as ort
    import tokenizers

    from edge_llm import __version__
    from edge_llm.paths import cache_dir

    cpu = _cpuinfo()
    return {
        "edge_llm": __version__,
        "cache": str(cache_dir()),
        "extras": installed_extras(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": cpu.get("model name") or cpu.get("Hardware") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_features": sorted(
            f for f in _FLAGS if f in (cpu.get("flags", "") + " " + cpu.get("Features", "")).split()
        ),
        "memory_total_mib": _meminfo("MemTotal"),
        "memory_available_mib": _meminfo("MemAvailable"),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "numpy": numpy.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if ":" in line:
                key, value = (s.strip() for s in line.split(":", 1))
                out.setdefault(key, value)
    return out


def _meminfo(key: str) -> int | None:
    path = Path("/proc/meminfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return None


def installed_extras() -> dict[str, str]:
    """Each extra of the installed edge-llm: "yes", or which of its packages are missing (read
    from the package's own metadata, so the list never drifts from pyproject.toml)."""
    from importlib import metadata

    try:
        requires = metadata.distribution("edge-llm").requires or []
    except metadata.PackageNotFoundError:
        return {"?": "edge-llm is not pip-installed (a source checkout on PYTHONPATH)"}
    missing: dict[str, list[str]] = {}
    for req in requires:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        name = re.match(r"[A-Za-z0-9._-]+", req)
        if not extra or not name:
            continue  # a hard dependency
        gone = missing.setdefault(extra.group(1), [])
        try:
            metadata.version(name.group(0))
        except metadata.PackageNotFoundError:
            gone.append(name.group(0))
    return {extra: "missing " + ", ".join(gone) if gone else "yes" for extra, gone in missing.items()}


def run(args: argparse.Namespace) -> int:
    info = facts()
    plan = _memory_plan(args)
    if args.json:
        if plan is not None:
            info["memory_plan"] = {**plan.__dict__, "total_mb": plan.total_mb}
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = [f"{k}: {v}" for k, v in value.items()]
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{key:<{width}}  {shown}")
    if plan is not None:
        print("\n".join(["", *plan.lines()]))
    return 0


def _memory_plan(args: argparse.Namespace) -> Any:
    """The plan `serve` would make for --bundle (a too-small budget raises its ConfigError)."""
    if not getattr(args, "bundle", None):
        return None
    from edge_llm.board import load_board
    from edge_llm.bundle import load_bundle
    from edge_llm.memory import plan_memory

    return plan_memory(load_bundle(args.bundle, verify=False), load_board(args.config), args.memory_mb)
