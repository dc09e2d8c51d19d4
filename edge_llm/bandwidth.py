"""How close batch-1 decode is to this machine's memory limit (issue 17 item 5).

One decode step of a batch-1 decoder reads every matmul weight once, so tokens/s × the weight
bytes read per token is the memory traffic the runtime sustains. Two figures make that a fraction:

- `weight_bytes_per_token(graph)`: the bytes of the quantized matmul weights and their scales /
  zero points in an ONNX graph (every initializer input of a matmul op; the embedding's row
  gather reads one row per token and is left out). Read from the graph's protobuf with a small
  wire-format reader, because the runtime does not depend on the `onnx` package; the sizes come
  from each initializer's dims and data type, so external data files are never opened.
- `read_bandwidth(threads)`: a short streaming read with numpy over a buffer several times the
  last-level cache, split over `threads` Python threads (numpy releases the GIL in reductions), the
  best of a few passes — what this machine gives a plain reader right now.

Caveats, said where the figures are shown: onnxruntime may repack int8 weights at load time (a few
percent more or less than the file's bytes), part of the weights can stay in the last-level cache
between tokens (so a runtime can exceed a fraction of 1.0 when its weights are not much larger than
that cache), and on a shared host the limit moves with the neighbours' load.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# ONNX TensorProto.DataType -> bytes per element (onnx.proto3); the 4-bit types pack two per byte.
_ITEM_BYTES = {
    1: 4,
    2: 1,
    3: 1,
    4: 2,
    5: 2,
    6: 4,
    7: 8,
    9: 1,
    10: 2,
    11: 8,
    12: 4,
    13: 8,
    16: 2,
    17: 1,
    18: 1,
    19: 1,
    20: 1,
    21: 0.5,
    22: 0.5,
}
# Ops whose initializers a decode step streams in full (input 0 is the activation): the fused
# graph's int8 matmuls, and the plain / integer matmuls of optimum graphs. QDQ graphs keep their
# weights behind DequantizeLinear and are not counted (0 bytes: the limit columns stay empty).
_STREAMED_OPS = frozenset({b"MatMulNBits", b"MatMul", b"Gemm", b"MatMulInteger", b"DynamicQuantizeMatMul"})
MIB = 1 << 20


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Any:
    """(field number, wire type, value) of one protobuf message: bytes for length-delimited
    fields, ints for varints; fixed-width fields are skipped (none of the ones read here are)."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, wire, value
        elif wire == 2:
            size, i = _varint(buf, i)
            yield field, wire, buf[i : i + size]
            i += size
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor_bytes(tensor: bytes) -> tuple[bytes, float]:
    """(name, size in bytes) of a TensorProto from its dims (1) and data type (2)."""
    name, dims, dtype = b"", [], 1
    for field, wire, value in _fields(tensor):
        if field == 1:
            if wire == 0:
                dims.append(value)
            else:  # packed repeated int64
                j = 0
                while j < len(value):
                    d, j = _varint(value, j)
                    dims.append(d)
        elif field == 2:
            dtype = value
        elif field == 8:
            name = value
    if dtype not in _ITEM_BYTES:
        raise ValueError(f"tensor {name.decode(errors='replace')}: unknown ONNX data type {dtype}")
    return name, float(np.prod(dims, dtype=np.float64)) * _ITEM_BYTES[dtype]


def weight_bytes_per_token(graph: str | Path) -> dict[str, Any]:
    """Bytes of streamed matmul weights (+ scales, zero points) one batch-1 decode step reads."""
    model = Path(graph).read_bytes()
    graph_msg = next((v for f, w, v in _fields(model) if f == 7 and w == 2), None)
    if graph_msg is None:
        raise ValueError(f"{graph}: no graph in this ONNX file")
    sizes: dict[bytes, float] = {}
    streamed: set[bytes] = set()
    ops = 0
    for field, wire, value in _fields(graph_msg):
        if wire != 2:
            continue
        if field == 5:  # initializer
            name, size = _tensor_bytes(value)
            sizes[name] = size
        elif field == 1:  # node
            inputs = [v for f, w, v in _fields(value) if f == 1 and w == 2]
            op = next((v for f, w, v in _fields(value) if f == 4 and w == 2), b"")
            if op in _STREAMED_OPS:
                ops += 1
                streamed.update(inputs[1:])
    total = sum(sizes[name] for name in streamed if name in sizes)
    return {"bytes": int(total), "matmuls": ops, "ops": sorted(o.decode() for o in _STREAMED_OPS)}


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports (sysfs), or None where it cannot be read."""
    best = None
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        try:
            value = (
                int(text[:-1]) * {"K": 1 << 10, "M": MIB, "G": 1 << 30}[text[-1]]
                if text[-1].isalpha()
                else int(text)
            )
        except (KeyError, ValueError):
            continue
        best = value if best is None else max(best, value)
    return best


def read_bandwidth(threads: int = 2, passes: int = 5, buffer_mib: int | None = None) -> dict[str, Any]:
    """Streaming read bandwidth (GB/s, 1e9 bytes) with `threads` reader threads: the best and the
    median of `passes` full reads of a buffer at least 8× the last-level cache (and 256 MiB)."""
    llc = last_level_cache_bytes()
    if buffer_mib is None:
        buffer_mib = min(1024, max(256, 8 * (llc or 0) // MIB))
    buf = np.ones(buffer_mib * MIB // 8, dtype=np.uint64)  # touched, so every page is resident
    parts = np.array_split(buf, max(1, threads))
    rates: list[float] = []
    for _ in range(max(1, passes)):
        workers = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return {
        "gb_s": max(rates),
        "gb_s_median": statistics.median(rates),
        "gb_s_runs": rates,
        "threads": threads,
        "buffer_mib": buffer_mib,
        "llc_bytes": llc,
        "loadavg_1min": os.getloadavg()[0],
    }


def decode_traffic(decode_tok_s: float, bytes_per_token: int, limit_gb_s: float) -> dict[str, float]:
    """Batch-1 decode as weight traffic: GB/s of weights read and its fraction of the limit."""
    gb_s = decode_tok_s * bytes_per_token / 1e9
    return {"weight_gb_s": gb_s, "fraction_of_limit": gb_s / limit_gb_s}
