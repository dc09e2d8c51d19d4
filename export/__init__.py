"""The workstation export pipeline: load → prune → distill → to_onnx → quantize (→ fix_shapes) →
bundle → evaluate → report.

Each stage is one module with a frozen config dataclass and one stage shape (`export/stage.py`);
`recipe.py` chains them and caches each stage's output so a changed later stage does not redo
earlier ones. Needs the `export` extra (torch, transformers, optimum-onnx, ...); the runtime never
imports this package. Importing it is light: `missing()` tells a runtime-only install what it
lacks before any work (a download, a `.partial` folder) starts.
"""

from __future__ import annotations

import importlib.util

# Top-level modules of the `export` extra that the pipeline cannot run without (pyproject.toml).
EXTRA_MODULES = ("torch", "transformers", "optimum", "onnx", "gguf", "safetensors")
INSTALL_HINT = "pip install 'edge-llm[export]'"


def missing() -> list[str]:
    """The modules of the export extra that this interpreter cannot import."""
    out = []
    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            out.append(name)
    return out
