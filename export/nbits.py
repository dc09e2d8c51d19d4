"""Blockwise weight encoding for ONNX Runtime's MatMulNBits, and the graph rewrite that uses it
(plus its per-channel alternative, DynamicQuantizeMatMul: `rewrite_channel_int8`).

In: fp32 weight matrices W [K, N] (MatMul initializers of an ONNX graph). Out: MatMulNBits
weights — packed unsigned codes [N, K/block, block*bits/8], one fp32 scale per block, optional
zero points — and, per weight, the error of the written encoding against the original.

Two encodings:
- `encode_int8`: symmetric 8-bit, scale = absmax/127 per block (code 128 = 0). Exact when W is
  already on a Q8_0 grid (GGUF Q8_0 uses the same rule), lossy (~0.5% RMS) otherwise.
- `encode_grid4`: recognises weights that lie exactly on a Q4_1 grid (w = d*q + m, q in 0..15,
  per block of 32 along K — what GGUF Q4_1 dequantizes to) and stores them losslessly as 4-bit
  codes with zero point 0 plus the block minima m. MatMulNBits has no float offset, so the
  offset term is added back as (block sums of A) @ m: a [.., K/32] x [K/32, N] MatMul, small
  next to the weight, and shared by every weight reading the same activation (q/k/v, gate/up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# A weight counts as "on the grid" when the re-encoded copy is this close (relative to its
# largest magnitude): fp16 scales rounded through fp32 land around 1e-7.
GRID_TOLERANCE = 1e-5


@dataclass(frozen=True)
class NBitsWeight:
    bits: int
    block: int
    k: int
    n: int
    packed: np.ndarray  # uint8 [N, blocks, block*bits/8]
    scales: np.ndarray  # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8, packed like MatMulNBits expects; None = default
    block_min: np.ndarray | None  # float32 [blocks, N]: offset term of a Q4_1 grid

    def dequantize(self) -> np.ndarray:
        """The [K, N] matrix the graph computes with (what the error report compares)."""
        if self.bits == 8:
            codes = self.packed.astype(np.float32)
        else:
            lo, hi = self.packed & 0x0F, self.packed >> 4
            codes = np.stack([lo, hi], axis=-1).reshape(self.n, -1, self.block).astype(np.float32)
        zero = float(1 << (self.bits - 1)) if self.zero_points is None else 0.0
        blocks = (codes - zero) * self.scales.reshape(self.n, -1, 1)
        if self.block_min is not None:
            blocks = blocks + self.block_min.T[:, :, None]
        return blocks.reshape(self.n, -1)[:, : self.k].T


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    k, n = w.shape
    pad = (-k) % block
    wt = np.ascontiguousarray(w.T, dtype=np.float32)
    if pad:
        wt = np.pad(wt, ((0, 0), (0, pad)))
    return wt.reshape(n, -1, block)


def encode_int8(w: np.ndarray, block: int = 32) -> NBitsWeight:
    b = _blocks(w, block)
    scale = np.abs(b).max(axis=-1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    codes = (np.clip(np.rint(b / scale), -127, 127) + 128).astype(np.uint8)
    k, n = w.shape
    return NBitsWeight(8, block, k, n, codes, scale.reshape(-1).astype(np.float32), None, None)


def encode_grid4(w: np.ndarray, block: int = 32) -> NBitsWeight | None:
    """Lossless 4-bit encoding if `w` lies on a Q4_1 grid, else None."""
    k, n = w.shape
    if k % block:
        return None
    b = _blocks(w, block)
    lo = b.min(axis=-1, keepdims=True)
    step = (b.max(axis=-1, keepdims=True) - lo) / 15.0
    step[step == 0] = 1.0
    codes = np.rint((b - lo) / step)
    if np.abs(codes * step + lo - b).max() > GRID_TOLERANCE * max(float(np.abs(b).max()), 1e-30):
        return None
    codes = codes.astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    blocks = k // block
    # MatMulNBits reads 4-bit codes as (q - 8) * step without a zero-point input, and an explicit
    # zero-point input sends it to a slower kernel; so the 8 steps go into the offset term.
    offset = (lo + 8.0 * step).reshape(n, blocks).T.copy()
    return NBitsWeight(4, block, k, n, packed, step.reshape(-1).astype(np.float32), None, offset)


def weight_error(original: np.ndarray, encoded: NBitsWeight) -> dict[str, float]:
    return error(original, encoded.dequantize(), encoded.bits)


def error(original: np.ndarray, computed: np.ndarray, bits: int) -> dict[str, float]:
    """Relative RMS and max-abs error of the matrix a graph computes with against the original."""
    diff = computed - original
    ref = float((original.astype(np.float64) ** 2).mean())
    return {
        "bits": bits,
        "rel_rms": float(np.sqrt((diff.astype(np.float64) ** 2).mean() / max(ref, 1e-30))),
        "max_abs": float(np.abs(diff).max()),
    }


Encoder = Callable[[np.ndarray], NBitsWeight]
# (MatMul/Gemm node, its weight as [K, N], a name stem) -> (nodes, initializers, error report):
# what replaces one linear node.
Replacement = Callable[[Any, np.ndarray, str], tuple[list[Any], list[Any], dict[str, float]]]


def rewrite_matmuls(
    model: Any, encode: Encoder, accuracy_level: int | Callable[[str], int]
) -> dict[str, dict[str, float]]:
    """Replace every MatMul with a 2-D fp32 initializer weight by MatMulNBits, in place.

    Gemm(transB=1) linears (a tied LM head reading the embedding table) are replaced too.
    Returns the per-weight error report.
    """
    from onnx import helper, numpy_helper

    block_sums: dict[tuple[str, int], str] = {}

    def nbits_nodes(node: Any, w: np.ndarray, base: str) -> tuple[list[Any], list[Any], dict[str, float]]:
        enc = encode(w)
        names = [f"{base}_q{enc.bits}", f"{base}_scales"]
        inits = [numpy_helper.from_array(enc.packed, names[0]), numpy_helper.from_array(enc.scales, names[1])]
        inputs = [node.input[0], *names]
        if enc.zero_points is not None:
            inputs.append(f"{base}_zp")
            inits.append(numpy_helper.from_array(enc.zero_points, inputs[-1]))
        out = node.output[0] if enc.block_min is None else f"{base}_main"
        level = accuracy_level(node.name) if callable(accuracy_level) else accuracy_level
        nodes = [
            helper.make_node(
                "MatMulNBits",
                inputs,
                [out],
                name=f"{node.name}_nbits",
                domain="com.microsoft",
                K=enc.k,
                N=enc.n,
                bits=enc.bits,
                block_size=enc.block,
                accuracy_level=level,
            )
        ]
        if enc.block_min is not None:
            sums = _block_sums(node.input[0], enc, block_sums, nodes, inits)
            mins = f"{base}_block_min"
            inits.append(numpy_helper.from_array(enc.block_min, mins))
            nodes.append(helper.make_node("MatMul", [sums, mins], [f"{base}_offset"]))
            nodes.append(helper.make_node("Add", [out, f"{base}_offset"], [node.output[0]]))
        return nodes, inits, weight_error(w, enc)

    return replace_linears(model, nbits_nodes)


def rewrite_channel_int8(model: Any, reduce_range: bool) -> dict[str, dict[str, float]]:
    """Replace every linear (as `rewrite_matmuls` finds them) by DynamicQuantizeMatMul, in place:
    int8 weights with one scale per output channel (symmetric, +-127, or +-64 with
    `reduce_range` as onnxruntime's quantizer does), activations quantized to uint8 per tensor at
    run time inside the op. Written directly (not through ORT's quantizer and its optimizer), so
    the graph runs it as one node at any optimization level. Returns the per-weight error report.
    """
    from onnx import helper, numpy_helper

    levels = 64 if reduce_range else 127

    def channel_nodes(node: Any, w: np.ndarray, base: str) -> tuple[list[Any], list[Any], dict[str, float]]:
        scale = np.abs(w).max(axis=0) / levels
        scale[scale == 0] = 1.0
        codes = np.clip(np.rint(w / scale), -levels, levels).astype(np.int8)
        inits = [
            numpy_helper.from_array(codes, f"{base}_q8c"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_scale"),
        ]
        op = helper.make_node(
            "DynamicQuantizeMatMul",
            [node.input[0], f"{base}_q8c", f"{base}_scale"],
            [node.output[0]],
            name=f"{node.name}_dqmm",
            domain="com.microsoft",
        )
        return [op], inits, error(w, codes.astype(np.float32) * scale, 8)

    return replace_linears(model, channel_nodes)


def replace_linears(model: Any, replacement: Replacement) -> dict[str, dict[str, float]]:
    """Run `replacement` on every linear node with a 2-D fp32 initializer weight, in place; drop
    weights no node reads any more. Returns {weight name: error report}."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    errors: dict[str, dict[str, float]] = {}
    new_nodes: list[Any] = []
    dead: set[str] = set()
    extra_inits: list[Any] = []
    for node in graph.node:
        weight = node.input[1] if _is_linear(node) else None
        init = inits.get(weight) if weight else None
        if init is None or len(init.dims) != 2 or init.data_type != 1:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(init)
        if node.op_type == "Gemm":  # transB=1: the weight is stored [N, K] (a tied embedding)
            w = w.T
        nodes, new_inits, errors[weight] = replacement(
            node, w, (node.name or weight).strip("/").replace("/", "_")
        )
        new_nodes += nodes
        extra_inits += new_inits
        uses[weight] -= 1
        if uses[weight] == 0:
            dead.add(weight)
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep + extra_inits)
    _ensure_opset(model, "com.microsoft", 1)
    return errors


def _is_linear(node: Any) -> bool:
    """MatMul(A, W), or Gemm(A, W, transB=1) with no bias and unit alpha/beta."""
    if node.op_type == "MatMul":
        return len(node.input) == 2
    if node.op_type != "Gemm" or len(node.input) != 2:
        return False
    attrs = {a.name: (a.i if a.type == 2 else a.f) for a in node.attribute}
    return attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0


def _block_sums(
    act: str, enc: NBitsWeight, cache: dict[tuple[str, int], str], nodes: list[Any], inits: list[Any]
) -> str:
    """Per-block sums of activation `act`, computed once per activation and block count."""
    from onnx import helper, numpy_helper

    blocks = enc.k // enc.block
    key = (act, blocks)
    if key not in cache:
        base = act.strip("/").replace("/", "_").replace(":", "_") + f"_bsum{blocks}"
        # [..., K] -> [..., blocks, block] whatever the rank: leading dims come from Shape(A).
        inits.append(numpy_helper.from_array(np.array([0], np.int64), base + "_zero"))
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), base + "_axes"))
        inits.append(numpy_helper.from_array(np.array([blocks, enc.block], np.int64), base + "_tail"))
        nodes.append(helper.make_node("Shape", [act], [base + "_shape"]))
        nodes.append(
            helper.make_node("Slice", [base + "_shape", base + "_zero", base + "_axes"], [base + "_lead"])
        )
        nodes.append(
            helper.make_node("Concat", [base + "_lead", base + "_tail"], [base + "_newshape"], axis=0)
        )
        nodes.append(helper.make_node("Reshape", [act, base + "_newshape"], [base + "_r"]))
        nodes.append(helper.make_node("ReduceSum", [base + "_r", base + "_axes"], [base], keepdims=0))
        cache[key] = base
    return cache[key]


def _ensure_opset(model: Any, domain: str, version: int) -> None:
    from onnx import helper

    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def encode_auto(w: np.ndarray, block: int = 32) -> NBitsWeight:
    """Lossless 4-bit when `w` is on a Q4_1 grid, else symmetric int8 (exact on a Q8_0 grid)."""
    return encode_grid4(w, block) or encode_int8(w, block)
