"""The runtime stays small: importing it (and its CLI) never pulls torch, transformers or optimum."""

from __future__ import annotations

import subprocess
import sys

RUNTIME_MODULES = [
    "edge_llm",
    "edge_llm.engine",
    "edge_llm.runner",
    "edge_llm.bundle",
    "edge_llm.providers",
    "edge_llm.sampling",
    "edge_llm.tokenizer",
    "edge_llm.board",
    "edge_llm.cli",
]


def test_runtime_imports_no_heavy_packages() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {RUNTIME_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "import edge_llm.cli as c; c.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(bad); assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
