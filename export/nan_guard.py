"""Drop the NaN guard that torch's SDPA export puts after every attention softmax.

torch exports `scaled_dot_product_attention` with a boolean mask as

    bias = Where(mask, 0, -inf);  p = Softmax(QK^T + bias);  p = Where(IsNaN(p), 0, p)

The guard exists for rows whose every key is masked: their softmax is over all -inf, i.e. NaN.
OpenVINOExecutionProvider (onnxruntime-openvino 1.24.1) has no IsNaN, so each layer's guard runs
on the CPU EP and splits the graph into one OpenVINO subgraph per layer (30 CPU nodes in SmolLM2).

`drop` writes the bias with float32's lowest finite value instead of -inf and removes the guard.
Why that is safe:
- A row with at least one unmasked key is unchanged: exp(lowest + s - max) is exactly 0.0 in
  float32, as exp(-inf) is, so the softmax is bit-for-bit the same function of the unmasked scores.
- A row with every key masked (a left-padding query of a batched prompt) now averages the values
  uniformly instead of returning zeros: finite, so no NaN reaches the KV cache; and such a row is
  itself a padding position, whose logits the runtime never reads and whose keys and values every
  later query masks, with a weight of exactly 0 (0 x finite = 0).
So no real position's output can differ; and with finite inputs every softmax input is finite (a
score plus the bias rounds to the lowest value, not -inf, unless the score's magnitude exceeds
~1e31), so a NaN the guard would catch cannot arise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from export.onnx_graph import const_value, index

LOWEST = float(np.finfo(np.float32).min)


def drop(model: Any) -> int:
    """In place: every guard of the form above removed, its bias made finite. Returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    producers, consumers, inits = index(graph)

    def const(name: str) -> np.ndarray | None:
        return const_value(name, producers, inits)

    lowest = numpy_helper.from_array(np.array([LOWEST], np.float32), "nan_guard_lowest")
    dead: set[str] = set()  # node outputs to remove
    rewire: dict[str, str] = {}  # guard output -> softmax output
    for isnan in [n for n in graph.node if n.op_type == "IsNaN"]:
        softmax = producers.get(isnan.input[0])
        users = consumers.get(isnan.output[0], [])
        if softmax is None or softmax.op_type != "Softmax" or len(users) != 1:
            continue
        guard = users[0]
        zero = const(guard.input[1]) if guard.op_type == "Where" else None
        if zero is None or zero.size != 1 or zero.item() != 0.0 or guard.input[2] != softmax.output[0]:
            continue
        add = producers.get(softmax.input[0])
        bias = None
        if add is not None and add.op_type == "Add":
            bias = next((producers.get(i) for i in add.input if _is_bias(producers.get(i), const)), None)
        if bias is None:
            continue  # a -inf we cannot see: keep the guard
        bias.input[2] = lowest.name
        dead |= {isnan.output[0], guard.output[0]}
        rewire[guard.output[0]] = softmax.output[0]
    if not rewire:
        return 0
    graph.initializer.append(lowest)
    nodes = [n for n in graph.node if not (set(n.output) & dead)]
    for n in nodes:
        n.input[:] = [rewire.get(i, i) for i in n.input]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or n.output[0] in used]  # the -inf and 0 left
    for out in graph.output:
        if out.name in rewire:
            raise ValueError(f"{out.name}: a graph output is a NaN guard")  # never in a decoder
    del graph.node[:]
    graph.node.extend(nodes)
    return len(rewire)


def _is_bias(node: Any, const: Any) -> bool:
    """Where(mask, 0, -inf): the attention bias a boolean mask becomes."""
    if node is None or node.op_type != "Where":
        return False
    zero, minus_inf = const(node.input[1]), const(node.input[2])
    return (
        zero is not None
        and minus_inf is not None
        and zero.size == 1
        and minus_inf.size == 1
        and zero.item() == 0.0
        and np.isneginf(minus_inf).all()
    )
