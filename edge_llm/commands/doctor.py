"""`edge-llm doctor`: what this board offers — CPU features, memory, onnxruntime and providers —
and what is installed: edge-llm's version, its cache folder and which extras are present."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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
    p.add_argument(
        "--bundle",
        help="also check this bundle's requirements, run one token per provider and plan its memory",
    )
    p.add_argument(
        "--boards",
        default="configs/boards",
        help="folder of board profiles to show the provider choice of (skipped when absent)",
    )
    # The memory plan section (edge_llm.memory): needs --bundle; the profile and budget are optional.
    p.add_argument("--config", help="board profile TOML for the memory plan")
    p.add_argument("--memory-mb", type=int, metavar="MB", help="budget (default: [runtime] memory_mb)")
    p.set_defaults(handler=run)


def facts() -> dict[str, Any]:
    import numpy
    import onnxruntime as ort
    import tokenizers

    from edge_llm import __version__, plugin_eps
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
        # Plugin EPs (onnxruntime-qnn) are listed only once registered, which a plan does on use.
        "plugin_providers": plugin_eps.installed(),
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


def bundle_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """The bundle's recorded requirements and whether this onnxruntime meets them."""
    if not args.bundle:
        return None
    import onnxruntime as ort

    from edge_llm.bundle import load_bundle, requirements_problem

    bundle = load_bundle(args.bundle)
    req = bundle.requirements
    problem = requirements_problem(bundle, ort.__version__)
    return {
        "path": str(bundle.path),
        "name": bundle.name,
        "needs_onnxruntime": req.onnxruntime if req else "not recorded (older bundle)",
        "target": req.target if req else "not recorded",
        "contrib_ops": list(req.contrib_ops) if req else [],
        "requirements_met": problem is None,
        **({"problem": problem} if problem else {}),
        # the options its target was measured with, applied beneath a board profile's own
        **(
            {"provider_options": [f"{n}: {json.dumps(o)}" for n, o in bundle.provider_options.items()]}
            if bundle.provider_options
            else {}
        ),
    }


def profiles_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """The provider each board profile would run on with this onnxruntime build (profiles from
    --boards, by default a checkout's configs/boards; none found: no section)."""
    from edge_llm.board import load_board
    from edge_llm.errors import EdgeLLMError
    from edge_llm.providers import plan_providers

    if not Path(args.boards).is_dir():
        return None
    out: dict[str, Any] = {}
    for path in sorted(Path(args.boards).glob("*.toml")):
        try:
            plan = plan_providers(load_board(path).runner_options().providers)
            out[path.stem] = plan.chosen
        except EdgeLLMError as exc:
            out[path.stem] = f"error: {exc}"
    return out


def smoke_section(args: argparse.Namespace) -> dict[str, Any] | None:
    """One token through the bundle's graph on each provider this build offers (finite logits =
    ok), naming the provider the session put first; nodes it cannot run still fall back to CPU."""
    if not args.bundle:
        return None
    import onnxruntime as ort

    from edge_llm import plugin_eps
    from edge_llm.engine import Engine
    from edge_llm.errors import EdgeLLMError
    from edge_llm.providers import ProviderSpec, short_name
    from edge_llm.runner import RunnerOptions

    out: dict[str, Any] = {}
    for provider in dict.fromkeys([*ort.get_available_providers(), *plugin_eps.installed()]):
        name = short_name(provider)
        if name is None:
            out[provider] = "skipped: no edge-llm provider name"
            continue
        t0 = time.perf_counter()
        try:
            options = RunnerOptions(
                providers=(ProviderSpec(name),), threads=1, spin=False, max_context=64, max_batch=1
            )
            engine = Engine.load(args.bundle, options, verify=False)
            ran = engine.runner.session.get_providers()[0]
            cache = engine.runner.empty(1)
            logits = engine.runner.forward(np.array([[engine.bundle.tokenizer.pad_id]], np.int64), cache)
            ok = bool(np.isfinite(logits).all())
            seconds = time.perf_counter() - t0
            out[provider] = f"{'ok' if ok else 'non-finite logits'} on {ran} ({seconds:.2f} s)"
        except (EdgeLLMError, RuntimeError, ValueError) as exc:
            out[provider] = f"failed: {str(exc).splitlines()[0][:200]}"
    return out


# Sections after the system facts; each returns a JSON-able value (None: not shown). Add yours.
SECTIONS: list[tuple[str, Callable[[argparse.Namespace], Any]]] = [
    ("bundle", bundle_section),
    ("board_profiles", profiles_section),
    ("smoke", smoke_section),
]


def run(args: argparse.Namespace) -> int:
    info: dict[str, Any] = facts()
    for key, section in SECTIONS:
        value = section(args)
        if value is not None:
            info[key] = value
    plan = _memory_plan(args)
    if args.json:
        if plan is not None:
            info["memory_plan"] = {**plan.__dict__, "total_mb": plan.total_mb}
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            inner = max((len(k) for k in value), default=0)
            for k, v in value.items():
                print(f"  {k:<{inner}}  {', '.join(v) if isinstance(v, list) else v}")
            continue
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
