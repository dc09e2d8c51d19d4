"""Small helpers the graph passes and graph stages share (one copy of each, called everywhere).

- `index`: who produces and who reads each tensor, and the initializers by name: what every
  pattern-matching rewrite (fp16_norm, nan_guard) walks.
- `const_value`: a tensor's value when the graph fixes it (initializer or Constant node).
- `link_or_copy`: put a weight file next to a rewritten graph without a second copy on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """(producers: output -> node, consumers: input -> nodes reading it, inits: name -> tensor)."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in graph.initializer}
    return producers, consumers, inits


def const_value(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> np.ndarray | None:
    """The value of `name` when it is an initializer or a Constant node's output (graph passes)."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content: a hard link (same file system: no second copy of the
    weights), else a copy. Not a symlink: onnxruntime refuses external data behind a link out of
    the model's folder. The link goes to the resolved file, so a symlinked `src` works too."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)
