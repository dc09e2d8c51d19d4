"""Blockwise weight encoding for ONNX Runtime's MatMulNBits, and the graph rewrite that uses it.

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
    diff = encoded.dequantize() - original
    ref = float((original.astype(np.float64) ** 2).mean())
    return {
        "bits": encoded.bits,
        "rel_rms": float(np.sqrt((diff.astype(np.float64) ** 2).mean() / max(ref, 1e-30))),
        "max_abs": float(np.abs(diff).max()),
    }


Encoder = Callable[[np.ndarray], NBitsWeight]


def rewrite_matmuls(
    model: Any, encode: Encoder, accuracy_level: int | Callable[[str], int]
) -> dict[str, dict[str, float]]:
    """Replace every MatMul with a 2-D fp32 initializer weight by MatMulNBits, in place.

    Gemm(transB=1) linears (a tied LM head reading the embedding table) are replaced too.
    Returns the per-weight error report.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    errors: dict[str, dict[str, float]] = {}
    new_nodes: list[Any] = []
    dead: set[str] = set()
    block_sums: dict[tuple[str, int], str] = {}
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
        enc = encode(w)
        errors[weight] = weight_error(w, enc)
        base = (node.name or weight).strip("/").replace("/", "_")
        names = [f"{base}_q{enc.bits}", f"{base}_scales"]
        extra_inits += [
            numpy_helper.from_array(enc.packed, names[0]),
            numpy_helper.from_array(enc.scales, names[1]),
        ]
        inputs = [node.input[0], *names]
        if enc.zero_points is not None:
            inputs.append(f"{base}_zp")
            extra_inits.append(numpy_helper.from_array(enc.zero_points, inputs[-1]))
        out = node.output[0] if enc.block_min is None else f"{base}_main"
        level = accuracy_level(node.name) if callable(accuracy_level) else accuracy_level
        new_nodes.append(
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
        )
        if enc.block_min is not None:
            sums = _block_sums(node.input[0], enc, block_sums, new_nodes, extra_inits)
            mins = f"{base}_block_min"
            extra_inits.append(numpy_helper.from_array(enc.block_min, mins))
            new_nodes.append(helper.make_node("MatMul", [sums, mins], [f"{base}_offset"]))
            new_nodes.append(helper.make_node("Add", [out, f"{base}_offset"], [node.output[0]]))
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
