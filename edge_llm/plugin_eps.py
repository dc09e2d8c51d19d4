"""Plugin execution providers: EPs that ship as their own package and load into onnxruntime.

onnxruntime >= 1.23 can load an execution provider from a shared library at run time
(`register_execution_provider_library`); such a "plugin EP" is then selected by device
(`SessionOptions.add_provider_for_devices`), not by name: after registration it is listed by
`get_available_providers()`, but `InferenceSession(providers=["QNNExecutionProvider"])` silently
runs on CPU (checked with onnxruntime 1.32 + onnxruntime-qnn 2.7.0). Qualcomm's QNN EP is shipped
this way (`onnxruntime-qnn`, extra `qnn`); its x86_64 wheel carries `libQnnHtp.so`, the HTP
backend as a simulator, so the NPU path runs (slowly) on a workstation.

This module registers a plugin once per process when its package is installed, resolves its
backend library inside the package, adds it to session options by device, and compiles a graph
into an EPContext model (the QNN context binary a board loads without recompiling). It is also a
small command (`python -m edge_llm.plugin_eps compile ...`): the exporter runs the compile in an
interpreter that has onnxruntime-qnn, which the export venv (torch) usually has not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnxruntime as ort

from edge_llm.errors import ProviderError

log = logging.getLogger(__name__)

# ORT provider name -> (Python package, pip distribution): the plugin EPs this runtime knows.
PLUGINS: dict[str, tuple[str, str]] = {"QNNExecutionProvider": ("onnxruntime_qnn", "onnxruntime-qnn")}
QNN = "QNNExecutionProvider"
# The QNN plugin cannot pick a backend by itself ("Could not determine default backend path for
# device"): without one, a plan gets the HTP (the NPU, what `--provider qnn` means).
QNN_DEFAULT_BACKEND = "libQnnHtp.so"

_registered: set[str] = set()


def package(ort_name: str) -> ModuleType | None:
    """The plugin's Python package when installed (None: not a plugin EP, or not installed)."""
    if ort_name not in PLUGINS:
        return None
    try:
        return importlib.import_module(PLUGINS[ort_name][0])
    except ImportError:
        return None


def installed() -> list[str]:
    """The plugin EPs whose package is installed (registered or not yet)."""
    return [name for name, (module, _) in PLUGINS.items() if importlib.util.find_spec(module) is not None]


def register(ort_name: str) -> str | None:
    """Make `ort_name` available in this process if it is a plugin whose package is installed.

    Returns None when it is available (now or already), else why not, in one line."""
    if ort_name in _registered:
        return None
    if ort_name not in PLUGINS:
        return f"{ort_name} is not in this onnxruntime build"
    pkg = package(ort_name)
    if pkg is None:
        dist = PLUGINS[ort_name][1]
        return (
            f"{ort_name} is not in this onnxruntime build and its plugin package {dist} is not installed "
            f"(pip install 'edge-llm[qnn]')"
        )
    if not hasattr(ort, "register_execution_provider_library"):
        return (
            f"onnxruntime {ort.__version__} cannot load plugin EPs ({ort_name} needs onnxruntime >= 1.24.2)"
        )
    try:
        ort.register_execution_provider_library(ort_name, pkg.get_library_path())
    except Exception as exc:  # "already registered" (by someone else in this process) is fine
        if "already registered" not in str(exc):
            return f"{ort_name}: registering {pkg.get_library_path()} failed: {exc}"
    _registered.add(ort_name)
    log.info("providers: registered plugin %s %s from %s", ort_name, pkg.__version__, pkg.get_library_path())
    return None


def is_registered(ort_name: str) -> bool:
    return ort_name in _registered


def resolve_options(ort_name: str, options: dict[str, str]) -> dict[str, str]:
    """Options with a bare backend library name ("libQnnHtp.so", what board profiles say) made a
    path inside the plugin's package, where the plugin does not look by itself."""
    pkg = package(ort_name)
    if ort_name != QNN or pkg is None:
        return options
    out = dict(options)
    backend = out.get("backend_path", QNN_DEFAULT_BACKEND)
    if "/" not in backend:
        candidate = Path(pkg.get_library_path()).with_name(backend)
        if not candidate.is_file():
            raise ProviderError(f"{QNN}: backend {backend} is not in {candidate.parent} ({pkg.__name__})")
        backend = str(candidate)
    out["backend_path"] = backend
    return out


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to stdout meanwhile to stderr.

    The HTP simulator library prints a configuration note ("# LIBNATIVE: No alternate
    configuration ...") with C stdio when a session is created; stdout is where `generate`
    streams the answer and `doctor --json` its JSON. C stdio buffers it (flushed at exit when
    stdout is a pipe), so the buffer is flushed before fd 1 is restored."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):  # no C library to flush (not POSIX)
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def add_by_device(
    so: ort.SessionOptions, providers: Sequence[str], options: Sequence[dict[str, str]]
) -> None:
    """Append each provider but CPU to `so` by device, in order; onnxruntime adds the CPU EP
    after them for the nodes they cannot run."""
    for name, opts in zip(providers, options, strict=True):
        if name == "CPUExecutionProvider":
            continue
        devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
        if not devices:
            raise ProviderError(f"{name}: onnxruntime lists no device for it")
        so.add_provider_for_devices(devices, opts)


def compile_context(graph: Path, out: Path, options: dict[str, str], embed: bool = True) -> dict[str, Any]:
    """Compile `graph` with the QNN EP into the EPContext model `out` (its context binary inside
    when `embed`); returns what happened (seconds, sizes, nodes left outside the context)."""
    problem = register(QNN)
    if problem is not None:
        raise ProviderError(problem)
    options = resolve_options(QNN, options)
    so = ort.SessionOptions()
    add_by_device(so, [QNN], [options])
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_file_path", str(out))
    so.add_session_config_entry("ep.context_embed_mode", "1" if embed else "0")
    out.unlink(missing_ok=True)  # the EP refuses to overwrite an existing context model
    t0 = time.perf_counter()
    try:
        with native_stdout_to_stderr():  # our stdout is the JSON the exporter reads
            ort.InferenceSession(str(graph), sess_options=so)
    except Exception as exc:
        raise ProviderError(f"{graph}: QNN compile failed: {str(exc).splitlines()[0]}") from None
    seconds = time.perf_counter() - t0
    pkg = package(QNN)
    info = importlib.import_module(f"{PLUGINS[QNN][0]}.build_and_package_info")
    return {
        "seconds": round(seconds, 2),
        "bytes": out.stat().st_size,
        "outside_context": _ops_outside_context(out),
        "onnxruntime": ort.__version__,
        "onnxruntime_qnn": getattr(pkg, "__version__", "?"),
        "qnn_sdk": getattr(info, "qnn_version", "?"),
        "options": {k: v for k, v in options.items() if k != "backend_path"},
        "backend": Path(options["backend_path"]).name,
    }


def _ops_outside_context(path: Path) -> dict[str, int]:
    """Op counts of the nodes the EP left out of its context (they run on CPU); empty without
    the onnx package (not a runtime dependency)."""
    try:
        import onnx
    except ImportError:
        return {}
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type != "EPContext":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_llm.plugin_eps", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile graphs into QNN EPContext models; prints JSON")
    c.add_argument("pairs", nargs="+", metavar="GRAPH=OUT", help="graph to compile = context model to write")
    c.add_argument("--options", default="{}", help="QNN provider options as a JSON object")
    c.add_argument("--no-embed", action="store_true", help="write the context binary beside the model")
    args = ap.parse_args(argv)
    options = json.loads(args.options)
    results = {}
    for pair in args.pairs:
        graph, _, out = pair.partition("=")
        try:
            results[graph] = compile_context(Path(graph), Path(out), options, embed=not args.no_embed)
        except ProviderError as exc:
            print(f"edge-llm: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
