"""Build a fused ONNX Runtime decoder graph straight from a Hugging Face Llama-family checkpoint.

In: a Hugging Face folder (`config.json` + `*.safetensors`, optionally sharded) of a
LlamaForCausalLM-style model (Llama, SmolLM, Mistral without sliding window, Qwen2 with q/k/v
biases) and a `FuseConfig`.
Out: `out_dir/model.onnx` + `out_dir/model.onnx.data` (external weights) and a `FuseResult`
describing it. The graph uses ONNX Runtime contrib ops (com.microsoft), one block per layer:

    SimplifiedLayerNormalization | SkipSimplifiedLayerNormalization  (residual add fused in)
    MatMul qkv (packed)  -> GroupQueryAttention (rotary inside, shared KV buffer)
    MatMul o -> SkipSimplifiedLayerNormalization
    MatMul gate|up (packed) -> Split -> QuickGelu(alpha=1) = SiLU -> Mul -> MatMul down

Weights stay fp32 here: the quantize stage (`export/quantize.py`, `export/nbits.py`) is the one
quantizer, for this graph and optimum's alike, and rewrites these MatMuls as MatMulNBits.

IO contract (see docs/fused-graph.md for how to drive prefill / decode / ragged batches):
    input_ids                 int64 [B, S]
    attention_mask            int64 [B, T]   T = max over rows of (past + new); row b holds
                                             past_b + new_b ones (right padding), only the
                                             per-row count matters
    query_seqlens             int32 [B]      only with FuseConfig.query_seqlens_input: new
                                             (non-pad) tokens of each row in this step
    past_key_values.{i}.key   float32 [B, kv_heads, C, head_dim]   C <= max_context
    past_key_values.{i}.value float32 [B, kv_heads, C, head_dim]
    logits_to_keep            int64 []       only with logits="tail": K, 1 <= K <= S
    logits                    float32 [B, 1, V] ("last": each row's last real token),
                              [B, S, V] ("all") or [B, K, V] ("tail": last K real tokens)
    present.{i}.key / .value  float32 [B, kv_heads, C, head_dim]  bind to the past buffer
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from safetensors import safe_open

MS = "com.microsoft"
OPSET = 21
# Rope variants whose cos/sin table does not depend on the current sequence length, so a table
# precomputed for max_context is exact. "dynamic" and "longrope" switch tables with length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# Decoders with the Llama block (RMSNorm, rotary GQA, SiLU-gated MLP); Qwen2 adds q/k/v biases.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class FuseConfig:
    """What graph to build.

    max_context: rows of the rotary cos/sin table, i.e. the largest KV buffer (positions
        must stay below it). The buffer dimension itself is symbolic, so an engine may
        allocate less.
    logits: "last" = one row per sequence (generation), "all" = every position (perplexity),
        "tail" = the last `logits_to_keep` real tokens of each row, a runtime int64 scalar
        input (1 for prefill/decode, k+1 to verify k speculative drafts, in one graph).
    fuse_qkv / fuse_gate_up: one packed MatMul instead of three / two.
    query_seqlens_input: add the int32 `query_seqlens` [B] input, needed only when rows of
        one step carry different numbers of new tokens on top of a non-empty past.
    """

    max_context: int = 2048
    logits: Literal["last", "all", "tail"] = "last"
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    query_seqlens_input: bool = False
    model_file: str = "model.onnx"
    data_file: str = "model.onnx.data"

    def __post_init__(self) -> None:
        if self.logits not in ("last", "all", "tail"):
            raise ValueError(f"logits must be 'last', 'all' or 'tail', not {self.logits!r}")
        if self.max_context < 1:
            raise ValueError("max_context must be positive")


@dataclass(frozen=True)
class FuseResult:
    model_path: Path
    data_path: Path
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    logits: Literal["last", "all", "tail"]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    op_counts: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0
    seconds: float = 0.0
    kv_layout: str = "shared"  # past and present are one [B, kv, C, d] buffer (edge_llm GraphSpec)


# --------------------------------------------------------------------------- weights


def load_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json, refusing what the graph would silently get wrong."""
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") not in SUPPORTED_TYPES:
        raise ValueError(f"model_type {cfg.get('model_type')!r} unsupported; known: {SUPPORTED_TYPES}")
    # Mistral uses its window whenever set; Qwen2 only with use_sliding_window.
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", cfg["model_type"] == "mistral"):
        raise ValueError("sliding-window attention is not supported by this builder")
    return cfg


def load_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors as float32 numpy (bf16/fp16 checkpoints are widened: numpy has no bf16)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = [p.name for p in sorted(hf_dir.glob("*.safetensors"))]
    if not shards:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors (save the model with safetensors)")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        with safe_open(str(hf_dir / shard), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = fh.get_tensor(name).to(torch.float32).numpy()
    return out


def rope_tables(cfg: dict[str, Any], rows: int, rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [rows, rotary_dim/2] computed exactly like transformers (float32 products)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise ValueError(f"rope_type {rope_type!r} is length-dependent; supported: {STATIC_ROPE}")
    hf_cfg = AutoConfig.for_model(**cfg)
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    if inv_freq.numel() * 2 != rotary_dim:
        raise ValueError(f"rotary table has {inv_freq.numel() * 2} dims, expected {rotary_dim}")
    pos = torch.arange(rows, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]  # same float32 product as HF's matmul
    cos = (freqs.cos() * attention_scaling).numpy().astype(np.float32)
    sin = (freqs.sin() * attention_scaling).numpy().astype(np.float32)
    return cos, sin


# --------------------------------------------------------------------------- graph builder


class _Graph:
    """Nodes + initializers; big initializers stream straight into the external data file."""

    def __init__(self, data_path: Path) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.data_path = data_path
        self.data = data_path.open("wb")
        self.weight_bytes = 0
        self._n = Counter[str]()

    def name(self, base: str) -> str:
        self._n[base] += 1
        return f"{base}_{self._n[base]}" if self._n[base] > 1 else base

    def const(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=arr.shape)
        raw = arr.tobytes()
        self.weight_bytes += len(raw)
        if len(raw) < 1024:
            tensor.raw_data = raw
        else:
            # Page-aligned offsets let ORT memory-map weights it does not repack.
            offset = -(-self.data.tell() // 4096) * 4096
            self.data.seek(offset)
            self.data.write(raw)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", self.data_path.name),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        self.inits.append(tensor)
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        n_out: int = 1,
        domain: str = "",
        name: str | None = None,
        outputs: list[str] | None = None,
        **attrs: Any,
    ) -> list[str]:
        base = name or op_type
        node_name = self.name(base)
        outs = outputs or [f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs

    def close(self) -> None:
        self.data.close()


class _Builder:
    def __init__(self, cfg: FuseConfig, hf: dict[str, Any], w: dict[str, np.ndarray], g: _Graph) -> None:
        self.cfg, self.hf, self.w, self.g = cfg, hf, w, g
        self.hidden = int(hf["hidden_size"])
        self.heads = int(hf["num_attention_heads"])
        self.kv_heads = int(hf.get("num_key_value_heads") or self.heads)
        self.head_dim = int(hf.get("head_dim") or self.hidden // self.heads)
        self.layers = int(hf["num_hidden_layers"])
        self.eps = float(hf.get("rms_norm_eps", 1e-6))
        self.vocab = int(hf["vocab_size"])

    # -- linear layers ----------------------------------------------------------------------

    def linear(
        self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, out: str | None = None
    ) -> str:
        """x @ weight.T (+ bias); weight is HF layout [N, K]. `out` names the result."""
        g = self.g
        outs = [out] if out else None
        if bias is None:
            return g.op("MatMul", [x, g.const(f"{name}.weight_t", weight.T)], name=name, outputs=outs)[0]
        y = g.op("MatMul", [x, g.const(f"{name}.weight_t", weight.T)], name=name)[0]
        return g.op("Add", [y, g.const(f"{name}.bias", bias)], name=f"{name}/bias", outputs=outs)[0]

    def weight(self, key: str) -> np.ndarray:
        return self.w[key]

    def bias(self, key: str) -> np.ndarray | None:
        return self.w.get(key)

    # -- graph pieces -----------------------------------------------------------------------

    def embed(self, ids: str) -> str:
        g = self.g
        self.embed_name = g.const("embed.weight", self.w["model.embed_tokens.weight"])
        return g.op("Gather", [self.embed_name, ids], name="embed")[0]

    def attention(self, i: int, h: str, seqlens_k: str, total: str, qlens: str, cos: str, sin: str) -> str:
        p = f"model.layers.{i}.self_attn."
        name = f"layers.{i}.attn"
        ws = [self.weight(p + f"{t}_proj.weight") for t in "qkv"]
        bs = [self.bias(p + f"{t}_proj.bias") for t in "qkv"]
        if self.cfg.fuse_qkv:
            bias = (
                None
                if all(b is None for b in bs)
                else np.concatenate(
                    [
                        b if b is not None else np.zeros(w.shape[0], np.float32)
                        for w, b in zip(ws, bs, strict=True)
                    ]
                )
            )
            qkv = [self.linear(h, f"{name}.qkv_proj", np.concatenate(ws), bias), "", ""]
        else:
            qkv = [self.linear(h, f"{name}.{t}_proj", w, b) for t, w, b in zip("qkv", ws, bs, strict=True)]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        out = self.g.op(
            "GroupQueryAttention",
            # GQA's 17th input (query_seqlens) exists only from onnxruntime 1.32 on; older builds
            # refuse a node with 17 inputs. Fed only when the graph takes it as an input.
            [*qkv, *past, seqlens_k, total, cos, sin, *([""] * 7 + [qlens] if qlens else [])],
            domain=MS,
            name=f"{name}.gqa",
            outputs=[f"{name}.gqa/out", *present],
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )[0]
        return self.linear(
            out, f"{name}.o_proj", self.weight(p + "o_proj.weight"), self.bias(p + "o_proj.bias")
        )

    def mlp(self, i: int, h: str) -> str:
        g = self.g
        p = f"model.layers.{i}.mlp."
        name = f"layers.{i}.mlp"
        gate_w, up_w = self.weight(p + "gate_proj.weight"), self.weight(p + "up_proj.weight")
        gate_b, up_b = self.bias(p + "gate_proj.bias"), self.bias(p + "up_proj.bias")
        if self.hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {self.hf.get('hidden_act')!r} unsupported (silu only)")
        if self.cfg.fuse_gate_up:
            bias = (
                None
                if gate_b is None and up_b is None
                else np.concatenate(
                    [b if b is not None else np.zeros(gate_w.shape[0], np.float32) for b in (gate_b, up_b)]
                )
            )
            gu = self.linear(h, f"{name}.gate_up_proj", np.concatenate([gate_w, up_w]), bias)
            gate, up = g.op("Split", [gu], 2, name=f"{name}.split", axis=-1, num_outputs=2)
        else:
            gate = self.linear(h, f"{name}.gate_proj", gate_w, gate_b)
            up = self.linear(h, f"{name}.up_proj", up_w, up_b)
        # QuickGelu(alpha=1) is x*sigmoid(x) = SiLU in one kernel (no CPU SwiGLU kernel exists).
        act = g.op("QuickGelu", [gate], domain=MS, name=f"{name}.silu", alpha=1.0)[0]
        act = g.op("Mul", [act, up], name=f"{name}.mul")[0]
        return self.linear(
            act, f"{name}.down_proj", self.weight(p + "down_proj.weight"), self.bias(p + "down_proj.bias")
        )

    def build(self) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        g, cfg, hd, kvh = self.g, self.cfg, self.head_dim, self.kv_heads
        f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
        inputs = [
            helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
        ]
        if cfg.query_seqlens_input:
            inputs.append(helper.make_tensor_value_info("query_seqlens", i32, ["batch"]))
        if cfg.logits == "tail":
            inputs.append(helper.make_tensor_value_info("logits_to_keep", i64, []))
        kv_shape = ["batch", kvh, "max_context", hd]
        for i in range(self.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_shape))

        # GQA's per-row lengths come from the mask: seqlens_k = ones - 1 (int32), and
        # total_sequence_length = mask width (an upper bound of every row's total).
        mask_sum = g.op(
            "ReduceSum", ["attention_mask", g.const("axis1", np.array([1]))], name="mask_sum", keepdims=0
        )[0]
        one = g.const("one_i64", np.array(1, np.int64))
        seqlens_k = g.op(
            "Cast", [g.op("Sub", [mask_sum, one], name="seqlens_minus1")[0]], name="seqlens_k", to=i32
        )[0]
        mask_shape = g.op("Shape", ["attention_mask"], name="mask_shape")[0]
        total = g.op(
            "Cast",
            [g.op("Gather", [mask_shape, one], name="mask_width", axis=0)[0]],
            name="total_seq_len",
            to=i32,
        )[0]
        # New tokens per row. With the `query_seqlens` input it goes to GQA (ragged chunks over a
        # past, idle rows; onnxruntime >= 1.32). Without it GQA gets no 17th input and assumes
        # min(S, row total) itself, which loads on every ORT from 1.23 on; the graph still needs
        # the count to gather each row's last real token.
        ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")[0]
        seq_len = g.op("Gather", [ids_shape, one], name="seq_len", axis=0)[0]
        if cfg.query_seqlens_input:
            qlens = "query_seqlens"
            qlens64 = g.op("Cast", [qlens], name="qlens_i64", to=i64)[0]
        else:
            qlens = ""
            qlens64 = g.op("Min", [mask_sum, seq_len], name="qlens_i64")[0]

        cos, sin = rope_tables(
            self.hf, cfg.max_context, int(hd * float(self.hf.get("partial_rotary_factor", 1.0)))
        )
        cos, sin = g.const("rope.cos", cos), g.const("rope.sin", sin)

        x = self.embed("input_ids")
        res = x
        h = g.op(
            "SimplifiedLayerNormalization",
            [x, g.const("layers.0.input_layernorm.weight", self.w["model.layers.0.input_layernorm.weight"])],
            name="layers.0.input_layernorm",
            axis=-1,
            epsilon=self.eps,
            stash_type=1,
        )[0]
        for i in range(self.layers):
            attn = self.attention(i, h, seqlens_k, total, qlens, cos, sin)
            h, res = self.skip_norm(
                attn,
                res,
                f"model.layers.{i}.post_attention_layernorm.weight",
                f"layers.{i}.post_attention_layernorm",
            )
            mlp = self.mlp(i, h)
            nxt = (
                f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < self.layers else "model.norm.weight"
            )
            h, res = self.skip_norm(mlp, res, nxt, nxt.removeprefix("model.").removesuffix(".weight"))

        if cfg.logits != "all":
            h = self.gather_tail(h, qlens64, one)
        self.lm_head(h)

        rows = {"last": 1, "all": "sequence", "tail": "logits_to_keep"}[cfg.logits]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", rows, self.vocab])]
        for i in range(self.layers):
            for kind in ("key", "value"):
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_shape))
        return inputs, outputs

    def gather_tail(self, h: str, qlens64: str, one: str) -> str:
        """Hidden states of each row's last 1 ("last") or logits_to_keep ("tail") real tokens,
        taken before the LM head so that prefill pays for one vocab projection per row, not S.
        Right padding puts row b's last real token at index qlens_b - 1."""
        g = self.g
        if self.cfg.logits == "last":
            idx = g.op("Sub", [qlens64, one], name="last_index")[0]
            idx = g.op("Reshape", [idx, g.const("shape_b11", np.array([-1, 1, 1]))], name="tail_index")[0]
        else:  # positions qlens_b - K .. qlens_b - 1, clamped at 0 for rows shorter than K
            zero = g.const("zero_i64", np.array(0, np.int64))
            steps = g.op("Range", [zero, "logits_to_keep", one], name="tail_range")[0]
            start = g.op("Sub", [qlens64, "logits_to_keep"], name="tail_start")[0]
            start = g.op("Unsqueeze", [start, g.const("axes_1", np.array([1]))], name="tail_start_b1")[0]
            idx = g.op("Max", [g.op("Add", [start, steps], name="tail_pos")[0], zero], name="tail_clamp")[0]
            idx = g.op("Unsqueeze", [idx, g.const("axes_2", np.array([2]))], name="tail_index")[0]
        idx = g.op("Expand", [idx, g.const("shape_11h", np.array([1, 1, self.hidden]))], name="tail_index_h")[
            0
        ]
        return g.op("GatherElements", [h, idx], name="tail_hidden", axis=1)[0]

    def skip_norm(self, x: str, skip: str, weight_key: str, name: str) -> tuple[str, str]:
        outs = self.g.op(
            "SkipSimplifiedLayerNormalization",
            [x, skip, self.g.const(f"{name}.weight", self.w[weight_key])],
            4,
            domain=MS,
            name=name,
            epsilon=self.eps,
        )
        return outs[0], outs[3]

    def lm_head(self, h: str) -> None:
        g = self.g
        tied = "lm_head.weight" not in self.w
        head = self.w["model.embed_tokens.weight"] if tied else self.w["lm_head.weight"]
        if tied:
            # Gemm(transB=1) reads the embedding table as is: one copy of the tied matrix.
            shape = g.op("Shape", [h], name="lm_head/in_shape")[0]
            flat = g.op(
                "Reshape", [h, g.const("shape_m1h", np.array([-1, self.hidden]))], name="lm_head/flatten"
            )[0]
            y = g.op("Gemm", [flat, self.embed_name], name="lm_head", transB=1)[0]
            out_shape = g.op(
                "Concat",
                [
                    g.op(
                        "Slice",
                        [shape, g.const("zero_i64_1", np.array([0])), g.const("two_i64_1", np.array([2]))],
                        name="lm_head/bs",
                    )[0],
                    g.const("vocab_1", np.array([self.vocab])),
                ],
                name="lm_head/out_shape",
                axis=0,
            )[0]
            g.op("Reshape", [y, out_shape], name="lm_head/unflatten", outputs=["logits"])
            return
        self.linear(h, "lm_head", head, self.w.get("lm_head.bias"), out="logits")


# --------------------------------------------------------------------------- entry point


def run(config: FuseConfig, hf_model_dir: Path, out_dir: Path) -> FuseResult:
    """Write `out_dir/config.model_file` (+ external data) for the checkpoint in hf_model_dir."""
    t0 = time.perf_counter()
    hf_model_dir, out_dir = Path(hf_model_dir), Path(out_dir)
    hf = load_hf_config(hf_model_dir)
    weights = load_weights(hf_model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = _Graph(out_dir / config.data_file)
    try:
        builder = _Builder(config, hf, weights, graph)
        inputs, outputs = builder.build()
    finally:
        graph.close()
    model = helper.make_model(
        helper.make_graph(graph.nodes, "edge_llm_fused", inputs, outputs, graph.inits),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
        producer_name="edge-llm export.fuse",
    )
    model.ir_version = 10
    model_path = out_dir / config.model_file
    onnx.save_model(model, str(model_path))
    return FuseResult(
        model_path=model_path,
        data_path=out_dir / config.data_file,
        num_layers=builder.layers,
        num_heads=builder.heads,
        num_kv_heads=builder.kv_heads,
        head_dim=builder.head_dim,
        hidden_size=builder.hidden,
        vocab_size=builder.vocab,
        max_context=config.max_context,
        logits=config.logits,
        inputs=tuple(v.name for v in inputs),
        outputs=tuple(v.name for v in outputs),
        op_counts=dict(Counter(n.op_type for n in graph.nodes)),
        weight_bytes=graph.weight_bytes,
        seconds=time.perf_counter() - t0,
    )
