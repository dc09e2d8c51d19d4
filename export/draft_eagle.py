"""The EAGLE-1-style draft (`[draft] kind = "eagle1"`): the stateless feature head of
`export/train_draft.py` plus one small decoder layer over the draft's own history.

Per position p the draft reads the pair (the main graph's final hidden state at p-1, the token
at p): fc(concat(state, embed(token))) -> one transformer layer (RMS norm, causal multi-head
attention with rotary positions over the earlier pairs, RMS norm, SwiGLU MLP) -> feature, its
guess of the main graph's state at p; the reduced-vocabulary head (tied to the embedding rows)
reads the feature and proposes the token at p+1. Drafting feeds the guessed feature back as the
next pair's state; the runtime (`edge_llm/speculate.py`) keeps the draft's own KV cache, and for
verified positions the main graph's real states replace the guessed ones (the cache is cut back
to the real pairs and they are fed).

History: the pairs of the current generation only, from the last prompt position on (the
prompt's states are not computed: the main graph returns the state of the positions it returns
logits for). Training matches: windows of `window` pairs that start at a chat's answer (or
anywhere in a text row), history empty at the window's start.

Training unrolls `unroll` draft steps in one pass each: step j at position p (its chain started
at p-j+1) reads the real pairs up to p-j+1 and the guessed pairs of steps 2..j at p-j+2..p, as
drafting does; every step is trained (CE on the main graph's greedy token + smooth-L1 to its
state) at once, with an attention mask over the keys of every pass (as HASS/EAGLE-3's
training-time test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

Corpus = Any  # export.train_draft.Corpus (which imports this module)

KIND = "eagle1"
# Graph IO beyond the stateless draft's (hidden, input_ids -> feature, logits): the draft's KV
# cache, one row per history pair (positions x heads*head_dim, so a prefix is a contiguous view).
PAST = ("past_key", "past_value")
PRESENT = ("present_key", "present_value")


def make_eagle(
    table: np.ndarray, intermediate: int, eps: float, heads: int, theta: float, max_positions: int
) -> Any:
    """The EAGLE-1 draft (torch), its embedding/LM-head table initialised from the model's rows."""
    import torch
    from torch import nn

    class Eagle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = table.shape[1]
            if h % heads:
                raise ValueError(f"draft: hidden size {h} is not a multiple of {heads} heads")
            self.heads, self.head_dim = heads, h // heads
            self.table = nn.Parameter(torch.from_numpy(table.copy()))  # [Vd + 1, H], tied in/out
            self.fc = nn.Parameter(torch.randn(2 * h, h) * (0.5 / h**0.5))
            self.ln1 = nn.Parameter(torch.ones(h))
            self.wq = nn.Parameter(torch.randn(h, h) / h**0.5)
            self.wk = nn.Parameter(torch.randn(h, h) / h**0.5)
            self.wv = nn.Parameter(torch.randn(h, h) / h**0.5)
            self.wo = nn.Parameter(torch.zeros(h, h))  # starts as fc + MLP alone
            self.ln2 = nn.Parameter(torch.ones(h))
            self.gate = nn.Parameter(torch.randn(h, intermediate) / h**0.5)
            self.up = nn.Parameter(torch.randn(h, intermediate) / h**0.5)
            self.down = nn.Parameter(torch.zeros(intermediate, h))
            inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
            angles = torch.outer(torch.arange(max_positions).float(), inv)  # [P, d/2]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

        def norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        def rope(self, x: torch.Tensor) -> torch.Tensor:
            """Rotary positions 0..S-1 on [B, heads, S, d] (the halves convention of Llama and of
            onnxruntime's RotaryEmbedding with interleaved=0)."""
            s, half = x.shape[2], self.head_dim // 2
            cos, sin = self.cos[:s], self.sin[:s]
            a, b = x[..., :half], x[..., half:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

        def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [B, heads, S, d]
            b, s, _ = x.shape
            return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        def forward(
            self, hidden: torch.Tensor, rows: torch.Tensor, passes: int
        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
            """(feature, logits) [B, W, .] of draft steps 1..`passes` over windows of pairs:
            `hidden` [B, W, H] the real states at p-1, `rows` [B, W] the draft rows of the tokens
            at p. Step j at p is the j-th draft of the chain that started at p-j+1."""
            b, w, h = hidden.shape
            emb = self.table[rows]
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            outs: list[tuple[torch.Tensor, torch.Tensor]] = []
            pos = torch.arange(w)
            state = hidden
            for j in range(1, passes + 1):
                if j > 1:  # position p reads step j-1's guess at p-1 (position 0: no chain)
                    state = torch.cat([hidden[:, :1], outs[-1][0][:, :-1]], 1)
                z = torch.cat([state, emb], -1) @ self.fc
                n = self.norm(z, self.ln1)
                q = self.rope(self.split(n @ self.wq))
                keys.append(self.rope(self.split(n @ self.wk)))
                values.append(self.split(n @ self.wv))
                # Step j's query at p sees pass 1 (real) keys up to p-j+1 and pass i's key at
                # p-j+i (i = 2..j: the chain's own guesses, itself last).
                allowed = [pos[None, :] <= (pos[:, None] - j + 1)]
                allowed += [pos[None, :] == (pos[:, None] - j + i) for i in range(2, j + 1)]
                mask = torch.cat(allowed, 1)  # [W, j*W]
                scores = q @ torch.cat(keys, 2).transpose(-1, -2) / self.head_dim**0.5
                scores = scores.masked_fill(~mask, float("-inf"))
                att = torch.softmax(scores, -1) @ torch.cat(values, 2)  # [B, heads, W, d]
                z = z + att.transpose(1, 2).reshape(b, w, h) @ self.wo
                n = self.norm(z, self.ln2)
                g = n @ self.gate
                f = z + (g * torch.sigmoid(g) * (n @ self.up)) @ self.down
                outs.append((f, f @ self.table.T))
            return outs

    return Eagle()


class Windows:
    """Training windows over a `Corpus`: `window` consecutive pairs p (state at p-1, token at p)
    of one sequence, starting at its first drafted pair (`first[r]`: a chat's answer; 1 in a
    text row) or later; shorter sequences give shorter windows, padded and masked."""

    def __init__(self, corpus: Corpus, first: np.ndarray, window: int) -> None:
        self.corpus, self.window = corpus, window
        starts, lengths = [], []
        for a, n, f in zip(corpus.starts, corpus.lengths, first, strict=True):
            f = max(1, int(f))
            for s in range(f, max(f, n - window) + 1):
                if s < n:
                    starts.append(a + s)
                    lengths.append(min(window, n - s))
        self.starts = np.asarray(starts, np.int64)  # global position of the window's first pair
        self.lengths = np.asarray(lengths, np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, pick: np.ndarray, vmap: np.ndarray) -> tuple[Any, ...]:
        """(state at p-1 [B, W, H], token rows at p, greedy rows at p (-100: none/out of
        vocabulary), state at p, valid [B, W]) for windows `pick`."""
        import torch

        c, w = self.corpus, self.window
        unk = int(vmap.max())
        idx = self.starts[pick, None] + np.arange(w)[None, :]
        valid = np.arange(w)[None, :] < self.lengths[pick, None]
        idx = np.where(valid, idx, self.starts[pick, None])  # padding repeats the first pair
        target = vmap[c.greedy[idx]]
        target = np.where(valid & (target != unk), target, -100)
        return (
            torch.from_numpy(c.hidden[idx - 1].astype(np.float32)),
            torch.from_numpy(vmap[c.ids[idx]]),
            torch.from_numpy(target),
            torch.from_numpy(c.hidden[idx].astype(np.float32)),
            torch.from_numpy(valid),
        )


def loss(head: Any, batch: tuple[Any, ...], unroll: int, hidden_weight: float, unk: int) -> Any:
    """Mean over draft steps of CE (greedy token) + smooth-L1 (next state), each step on the
    positions whose chain starts inside the window."""
    import torch
    import torch.nn.functional as F

    prev, rows, target, nxt, valid = batch
    total = torch.zeros(())
    for j, (f, logits) in enumerate(head(prev, rows, unroll), 1):
        t = target[:, j - 1 :]
        total = total + F.cross_entropy(
            logits[:, j - 1 :, :unk].flatten(0, 1), t.flatten(), ignore_index=-100
        )
        v = valid[:, j - 1 :]
        err = F.smooth_l1_loss(f[:, j - 1 :][v], nxt[:, j - 1 :][v]) if v.any() else torch.zeros(())
        total = total + hidden_weight * err
    return total


def agreement(head: Any, windows: Windows, vmap: np.ndarray, k: int) -> dict[str, Any]:
    """Held-out: how often draft step j = 1..k (fed the text's tokens, its own guessed states and
    its history) is the main graph's greedy token, over the chains inside each window."""
    import torch

    if not len(windows):
        return {}
    unk = int(vmap.max())
    hits, counts = np.zeros(k), np.zeros(k)
    with torch.inference_mode():
        for at in range(0, len(windows), 16):
            prev, rows, target, _, valid = windows.batch(np.arange(at, min(at + 16, len(windows))), vmap)
            for j, (_, logits) in enumerate(head(prev, rows, k)):
                v = valid[:, j:]  # an out-of-vocabulary greedy token (target -100) is a miss
                hits[j] += float((logits[:, j:, :unk].argmax(-1) == target[:, j:])[v].sum())
                counts[j] += float(v.sum())
    top1 = [round(h / max(c, 1), 4) for h, c in zip(hits, counts, strict=True)]
    return {"positions": int(counts[0]), "top1_by_step": top1}


def disjoint(corpus: Corpus, first: np.ndarray, window: int) -> Windows:
    """Held-out windows that tile each sequence from its first drafted pair (no overlap)."""
    w = Windows(corpus, first, window)
    keep = np.zeros(len(w), bool)
    seq_start = {int(a) + max(1, int(f)) for a, f in zip(corpus.starts, first, strict=True)}
    last_end = -1
    for i, (s, n) in enumerate(zip(w.starts, w.lengths, strict=True)):
        if int(s) in seq_start or s >= last_end:
            keep[i], last_end = True, s + n
    w.starts, w.lengths = w.starts[keep], w.lengths[keep]
    return w


def mlp_head_nodes(normed: str, residual: str) -> list[Any]:
    """The draft's SwiGLU MLP on `normed` plus `residual` -> `feature`, and the reduced-vocabulary
    head -> `logits`: the same nodes end both draft kinds' graphs (train_draft's stateless one)."""
    from onnx import helper  # lazily, as the graph writer below: onnx is an export-only import

    n = helper.make_node
    return [
        n("MatMul", [normed, "draft.gate"], ["gate"], name="gate_proj"),
        n("MatMul", [normed, "draft.up"], ["up"], name="up_proj"),
        n("QuickGelu", ["gate"], ["silu"], name="silu", domain="com.microsoft", alpha=1.0),
        n("Mul", ["silu", "up"], ["act"], name="mul"),
        n("MatMul", ["act", "draft.down"], ["mlp"], name="down_proj"),
        n("Add", [residual, "mlp"], ["feature"], name="residual"),
        n("Gemm", ["feature", "draft.table"], ["logits"], name="lm_head", transB=1),
    ]


def write_onnx(head: Any, vmap: np.ndarray, eps: float, theta: float, out: Path) -> None:
    """The EAGLE-1 draft as an fp32 ONNX graph (`edge_llm.bundle.DraftSpec` kind "eagle1")."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = {n: v.detach().float().numpy() for n, v in head.named_parameters()}
    h, nh, d = p["table"].shape[1], head.heads, head.head_dim
    cos, sin = head.cos.numpy(), head.sin.numpy()
    inits = [numpy_helper.from_array(vmap.astype(np.int64), "vocab_map")]
    inits += [numpy_helper.from_array(p[k], f"draft.{k}") for k in ("table", "fc", "ln1", "wq", "wk", "wv")]
    inits += [numpy_helper.from_array(p[k], f"draft.{k}") for k in ("wo", "ln2", "gate", "up", "down")]
    inits += [
        numpy_helper.from_array(cos.astype(np.float32), "rope.cos"),
        numpy_helper.from_array(sin.astype(np.float32), "rope.sin"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0, nh, d], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, h], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array(d**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "open"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "shut"),
    ]
    n = helper.make_node
    ms = "com.microsoft"
    nodes = [
        n("Gather", ["vocab_map", "input_ids"], ["rows"], name="rows"),
        n("Gather", ["draft.table", "rows"], ["embedded"], name="embed"),
        n("Concat", ["hidden", "embedded"], ["joined"], name="join", axis=-1),
        n("MatMul", ["joined", "draft.fc"], ["z"], name="fc"),
        n("SimplifiedLayerNormalization", ["z", "draft.ln1"], ["n1"], name="ln1", axis=-1, epsilon=eps),
        n("MatMul", ["n1", "draft.wq"], ["q"], name="q_proj"),
        n("MatMul", ["n1", "draft.wk"], ["k"], name="k_proj"),
        n("MatMul", ["n1", "draft.wv"], ["v"], name="v_proj"),
        # positions P..P+S-1 (P: the cached pairs)
        n("Shape", ["past_key"], ["past_len1"], name="past_len", start=0, end=1),
        n("Shape", ["input_ids"], ["new_len1"], name="new_len", start=0, end=1),
        n("Add", ["past_len1", "new_len1"], ["total1"], name="total"),
        n("Squeeze", ["past_len1", "axis0"], ["past_len0"], name="past_scalar"),
        n("Squeeze", ["total1", "axis0"], ["total0"], name="total_scalar"),
        n("Range", ["past_len0", "total0", "one"], ["qpos"], name="qpos"),
        n("Range", ["zero", "total0", "one"], ["kpos"], name="kpos"),
        n("Unsqueeze", ["qpos", "axis0"], ["qpos_b"], name="qpos_batch"),
        n("Unsqueeze", ["q", "axis0"], ["q3"], name="q3"),
        n("Unsqueeze", ["k", "axis0"], ["k3"], name="k3"),
        n(
            "RotaryEmbedding",
            ["q3", "qpos_b", "rope.cos", "rope.sin"],
            ["q_rot3"],
            name="q_rope",
            domain=ms,
            num_heads=nh,
        ),
        n(
            "RotaryEmbedding",
            ["k3", "qpos_b", "rope.cos", "rope.sin"],
            ["k_rot3"],
            name="k_rope",
            domain=ms,
            num_heads=nh,
        ),
        n("Squeeze", ["q_rot3", "axis0"], ["q_rot"], name="q_rot"),
        n("Squeeze", ["k_rot3", "axis0"], ["k_rot"], name="k_rot"),
        n("Concat", ["past_key", "k_rot"], ["present_key"], name="present_key", axis=0),
        n("Concat", ["past_value", "v"], ["present_value"], name="present_value", axis=0),
        n("Reshape", ["q_rot", "heads_shape"], ["q_h"], name="q_heads"),
        n("Transpose", ["q_h"], ["q_t"], name="q_t", perm=[1, 0, 2]),  # [nh, S, d]
        n("Reshape", ["present_key", "heads_shape"], ["k_h"], name="k_heads"),
        n("Transpose", ["k_h"], ["k_t"], name="k_t", perm=[1, 2, 0]),  # [nh, d, T]
        n("Reshape", ["present_value", "heads_shape"], ["v_h"], name="v_heads"),
        n("Transpose", ["v_h"], ["v_t"], name="v_t", perm=[1, 0, 2]),  # [nh, T, d]
        n("MatMul", ["q_t", "k_t"], ["raw_scores"], name="scores"),
        n("Mul", ["raw_scores", "scale"], ["scaled"], name="scale"),
        # causal: the pair at position P+i sees keys 0..P+i
        n("Unsqueeze", ["qpos", "axis1"], ["qcol"], name="qcol"),
        n("Unsqueeze", ["kpos", "axis0"], ["krow"], name="krow"),
        n("LessOrEqual", ["krow", "qcol"], ["allowed"], name="causal"),
        n("Where", ["allowed", "open", "shut"], ["mask"], name="mask"),
        n("Add", ["scaled", "mask"], ["masked"], name="masked"),
        n("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v_t"], ["ctx_t"], name="context"),
        n("Transpose", ["ctx_t"], ["ctx_h"], name="ctx_t", perm=[1, 0, 2]),
        n("Reshape", ["ctx_h", "flat_shape"], ["ctx"], name="ctx_flat"),
        n("MatMul", ["ctx", "draft.wo"], ["attn"], name="o_proj"),
        n("Add", ["z", "attn"], ["z2"], name="attn_residual"),
        n("SimplifiedLayerNormalization", ["z2", "draft.ln2"], ["n2"], name="ln2", axis=-1, epsilon=eps),
        *mlp_head_nodes("n2", "z2"),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "edge_llm_draft_eagle1",
        [
            helper.make_tensor_value_info("hidden", f32, ["n", h]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info(PAST[0], f32, ["past", h]),
            helper.make_tensor_value_info(PAST[1], f32, ["past", h]),
        ],
        [
            helper.make_tensor_value_info("feature", f32, ["n", h]),
            helper.make_tensor_value_info("logits", f32, ["n", p["table"].shape[0]]),
            helper.make_tensor_value_info(PRESENT[0], f32, ["total", h]),
            helper.make_tensor_value_info(PRESENT[1], f32, ["total", h]),
        ],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)],
        producer_name="edge-llm export.draft_eagle",
    )
    model.ir_version = 10
    onnx.save(model, str(out))
