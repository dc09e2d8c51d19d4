"""Stage 5c, compile_qnn (target qnn-htp): fixed-shape QDQ graphs in, their QNN context binaries out.

A Snapdragon board should not compile the HTP graph at every start (minutes for an LLM, and the
QNN compiler may not even ship there): the vendor flow compiles once on the workstation into an
EPContext model — an ONNX file whose single `EPContext` node carries the QNN context binary — and
the board's QNN EP loads that directly. This stage does it for both static graphs (`model.onnx`
decode, `prefill.onnx` prefill), with session options `ep.context_enable=1`,
`ep.context_file_path` and `ep.context_embed_mode=1` (binary inside the .onnx, one file per graph).

Output folder: the two graphs and their weight file (hard links: the CPU fallback and the source
for a recompile), `model_ctx.onnx`, `prefill_ctx.onnx` and `compile_qnn.json` (seconds, sizes,
versions). The bundle lists the contexts under `graph.contexts` with `context_provider`
"QNNExecutionProvider"; the runtime loads them when QNN leads (`edge_llm/runner.py`).

The compile needs onnxruntime-qnn, which the export venv (torch) usually lacks and which must not
replace its onnxruntime: it runs `python -m edge_llm.plugin_eps compile` in this interpreter when
it has the package, else in $EDGE_LLM_QNN_PYTHON (e.g. /work/venvs/qnn/bin/python).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import edge_llm
from edge_llm.errors import ExportError
from export.fix_shapes import DATA
from export.onnx_graph import link_or_copy
from export.stage import Artifact, Stage

REPORT = "compile_qnn.json"
PROVIDER = "QNNExecutionProvider"
GRAPHS = {"model.onnx": "model_ctx.onnx", "prefill.onnx": "prefill_ctx.onnx"}
PYTHON_ENV = "EDGE_LLM_QNN_PYTHON"
# The HTP simulator's default SoC fails to finalize any graph ("QNN_COMMON_ERROR_MEM_ALLOC",
# onnxruntime-qnn 2.7.0); a named one compiles. 57 = SM8650 (Snapdragon 8 Gen 3, Hexagon v75).
DEFAULT_SOC = 57


@dataclass(frozen=True)
class CompileConfig:
    soc_model: int = DEFAULT_SOC  # QNN SoC id the context binary is compiled for


def qnn_python() -> str:
    """An interpreter that can import onnxruntime_qnn: this one, or $EDGE_LLM_QNN_PYTHON."""
    if importlib.util.find_spec("onnxruntime_qnn") is not None:
        return sys.executable
    python = os.environ.get(PYTHON_ENV, "")
    if python:
        if not Path(python).is_file():
            raise ExportError(f"{PYTHON_ENV}={python}: no such interpreter")
        return python
    raise ExportError(
        "target qnn-htp compiles the graphs with onnxruntime-qnn, which this interpreter lacks: "
        f"pip install 'edge-llm[qnn]' in a venv of its own and set {PYTHON_ENV}=/path/to/that/venv/bin/python"
    )


def compile_graphs(config: CompileConfig, folder: Path) -> dict[str, dict[str, object]]:
    """Compile `folder`'s graphs into their EPContext models beside them; facts per graph."""
    python = qnn_python()
    root = str(Path(edge_llm.__file__).resolve().parents[1])  # edge_llm for the other interpreter
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    folder = folder.resolve()
    pairs = [f"{folder / g}={folder / c}" for g, c in GRAPHS.items()]
    options = json.dumps({"soc_model": str(config.soc_model)})
    cmd = [python, "-m", "edge_llm.plugin_eps", "compile", *pairs, "--options", options]
    # cwd = the checkout: `-m` puts the cwd first on sys.path, where another edge_llm may be.
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ExportError(f"qnn-htp: compiling the context binaries failed ({python}): {tail[0]}")
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    return {Path(graph).name: fact for graph, fact in facts.items()}


def build(config: CompileConfig, art: Artifact, out: Path, progress: bool) -> None:
    if art.graph is None or "prefill.onnx" not in art.extra_graphs:
        raise ExportError("target qnn-htp: no fixed-shape graphs to compile ([static] must come first)")
    out.mkdir(parents=True, exist_ok=True)
    sources = {"model.onnx": art.graph, "prefill.onnx": art.extra_graphs["prefill.onnx"]}
    for name, path in {**sources, DATA: art.graph.with_name(DATA)}.items():
        if path.exists():
            link_or_copy(path, out / name)
    if progress:
        print(f"export: compile_qnn      compiling for QNN SoC {config.soc_model} (HTP)...", file=sys.stderr)
    facts = compile_graphs(config, out)
    (out / REPORT).write_text(json.dumps({"soc_model": config.soc_model, "graphs": facts}, indent=2) + "\n")


def result(config: CompileConfig, art: Artifact, folder: Path) -> Artifact:
    report = json.loads((folder / REPORT).read_text())
    graphs = report["graphs"]
    return replace(
        art,
        graph=folder / "model.onnx",
        extra_graphs={
            **art.extra_graphs,
            "prefill.onnx": folder / "prefill.onnx",
            **{ctx: folder / ctx for ctx in GRAPHS.values()},
        },
        layout={**art.layout, "contexts": dict(GRAPHS), "context_provider": PROVIDER},
        facts={
            "soc_model": config.soc_model,
            "compile_s": round(sum(float(g["seconds"]) for g in graphs.values()), 2),
            "context_bytes": {GRAPHS[name]: g["bytes"] for name, g in graphs.items()},
            "outside_context": {GRAPHS[name]: g["outside_context"] for name, g in graphs.items()},
            "onnxruntime_qnn": next(iter(graphs.values()))["onnxruntime_qnn"],
            "qnn_sdk": next(iter(graphs.values()))["qnn_sdk"],
        },
    )


STAGE = Stage("compile_qnn", build, result)
