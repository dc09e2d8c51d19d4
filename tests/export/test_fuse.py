"""export.fuse against transformers on a tiny random Llama: every way the engine drives the graph.

(a) prefill from an empty cache, (b) 1-token decode, (c) multi-token step over a past
(chat continuation, speculative verify + rollback), (d) batches whose rows hold different
past lengths (right-padded prefill, decode, uniform and ragged chunks, per-row prefill into a
slice of the batch buffer). fp32 must match to 1e-4; int8 to INT8_ATOL plus equal top-1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from export import fuse  # noqa: E402
from export.fuse import FuseConfig  # noqa: E402
from export.fuse_check import FusedRunner, make_session  # noqa: E402

VOCAB, CAPACITY = 256, 64
FP32_ATOL = 1e-4
# accuracy_level 4 also quantizes activations to int8 inside MatMulNBits. On this model (logits
# within about ±3) that costs up to ~0.07 against the fp32 model; 0.15 = 5% of the logit range
# leaves margin, while a wrong position, row or cache slot shows up as O(1) errors.
INT8_ATOL = 0.15


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CAPACITY,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_dequant(hf_dir: Path) -> torch.nn.Module:
    """The same model with every matrix replaced by its int8 round trip: what the int8 graph
    must compute exactly when activations stay fp32 (accuracy_level 1)."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                q, scale, zp = fuse.quantize_blocks(param.numpy(), 32, symmetric=False)
                param.copy_(torch.from_numpy(fuse.dequantize_blocks(q, scale, zp, param.shape[1])))
    return model


# name -> (FuseConfig overrides, reference model fixture, tolerance)
VARIANTS = {
    "fp32": ({"bits": 0}, "hf_model", FP32_ATOL),
    "int8-exact": ({"bits": 8, "accuracy_level": 1}, "hf_dequant", FP32_ATOL),
    "int8": ({"bits": 8, "accuracy_level": 4}, "hf_model", INT8_ATOL),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[dict, torch.nn.Module, float]:
    kw, ref, atol = VARIANTS[request.param]
    return kw, request.getfixturevalue(ref), atol


@pytest.fixture(scope="module")
def build(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    def _build(**kw: object) -> fuse.FuseResult:
        cfg = fuse.FuseConfig(max_context=CAPACITY, **kw)  # type: ignore[arg-type]
        return fuse.run(cfg, hf_dir, tmp_path_factory.mktemp("fused"))

    return _build


def ref_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """[len(ids), V] logits of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def seqs(n: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, length).tolist() for _ in range(n)]


def runner(result: fuse.FuseResult, batch: int = 1) -> FusedRunner:
    return FusedRunner(make_session(result.model_path), batch, CAPACITY)


def close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max |diff| {err:.2e} > {atol:.0e}"


MODES = ("all", "last", "tail")


def check_row(out_row: np.ndarray, ref_new: np.ndarray, mode: str, keep: int, atol: float) -> None:
    """out_row: one row of the graph's logits; ref_new: reference logits of that row's n
    real new tokens. "all" returns S rows (real ones first), "last" the last real token,
    "tail" the last `keep` real tokens."""
    n = len(ref_new)
    if mode == "all":
        close(out_row[:n], ref_new, atol)
    elif mode == "last":
        close(out_row, ref_new[-1:], atol)
    else:
        close(out_row[-min(keep, n) :], ref_new[-keep:], atol)


# --------------------------------------------------------------------------- graph shape


def test_graph_io_and_ops(build) -> None:
    res = build(bits=8)
    assert res.inputs[:2] == ("input_ids", "attention_mask")
    assert res.inputs[2:4] == ("past_key_values.0.key", "past_key_values.0.value")
    assert res.outputs[:3] == ("logits", "present.0.key", "present.0.value")
    assert res.op_counts["GroupQueryAttention"] == 2
    assert res.op_counts["MatMulNBits"] == 2 * 4 + 1  # qkv, o, gate_up, down per layer + head
    assert res.op_counts["SkipSimplifiedLayerNormalization"] == 4
    assert "MatMul" not in res.op_counts
    sess = make_session(res.model_path)
    kv = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    assert kv.shape[1:] == [2, "max_context", 16]
    assert res.data_path.stat().st_size > res.weight_bytes * 0.9  # weights are external


def test_quantize_roundtrip() -> None:
    w = np.random.default_rng(0).standard_normal((8, 70)).astype(np.float32)
    for symmetric in (False, True):
        q, scale, zp = fuse.quantize_blocks(w, 32, symmetric)
        assert q.shape == (8, 3, 32) and scale.shape == (8, 3)
        back = fuse.dequantize_blocks(q, scale, zp, 70)
        assert np.abs(back - w).max() <= scale.max() * 0.5 + 1e-6  # half a step


# --------------------------------------------------------------------------- (a) (b) (c)


def test_prefill_decode_continue(build, variant) -> None:
    kw, model, atol = variant
    ids = seqs(1, 16)[0]
    ref = ref_logits(model, ids)
    for mode in MODES:
        r = runner(build(logits=mode, **kw))
        # (a) prefill 7 tokens from an empty cache (tail: logits of the last 2)
        check_row(r.step(np.array([ids[:7]]), keep=2)[0], ref[:7], mode, 2, atol)
        # (b) one-token decode
        check_row(r.step(np.array([ids[7:8]]))[0], ref[7:8], mode, 1, atol)
        # (c) a 4-token chunk over the past: chat next turn / speculative verification
        check_row(r.step(np.array([ids[8:12]]), keep=4)[0], ref[8:12], mode, 4, atol)
        # rollback: reject 2 of the 4 drafts, continue from position 10 with other tokens
        r.truncate(0, 10)
        alt = [*ids[:10], 5, 6, 7]
        out = r.step(np.array([alt[10:13]]), keep=3)
        check_row(out[0], ref_logits(model, alt)[10:13], mode, 3, atol)


def test_int8_close_to_fp32(build) -> None:
    """Quantization error on its own: same inputs through the fp32 and int8 graphs."""
    ids = np.array(seqs(4, 16, seed=3))
    fp = runner(build(bits=0, logits="all"), 4).step(ids)
    for symmetric in (False, True):
        q = runner(build(bits=8, logits="all", symmetric=symmetric), 4).step(ids)
        close(q, fp, INT8_ATOL)
        assert (q.argmax(-1) == fp.argmax(-1)).mean() >= 0.9


def test_greedy_matches_transformers(build, hf_model) -> None:
    prompt = seqs(1, 5, seed=7)[0]
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    r = runner(build(bits=0))
    got, logits = list(prompt), r.step(np.array([prompt]))
    for _ in range(12):
        got.append(int(logits[0, -1].argmax()))
        logits = r.step(np.array([[got[-1]]]))
    assert got == want[0].tolist()


# --------------------------------------------------------------------------- (d) batches


def test_batch_rows_with_different_past(build, variant) -> None:
    kw, model, atol = variant
    data = seqs(3, 20, seed=11)
    refs = [ref_logits(model, s) for s in data]
    lens = [3, 9, 5]
    for mode, qlens in [(m, False) for m in MODES] + [("tail", True)]:
        r = runner(build(logits=mode, query_seqlens_input=qlens, **kw), 3)
        # right-padded prefill from empty: row b holds lens[b] real tokens
        ids = np.zeros((3, max(lens)), np.int64)
        for b, n in enumerate(lens):
            ids[b, :n] = data[b][:n]
        out = r.step(ids, new_lens=lens, keep=2)
        for b, n in enumerate(lens):
            check_row(out[b], refs[b][:n], mode, 2, atol)
        # continuous-batching decode: one token per row, pasts 3 / 9 / 5
        out = r.step(np.array([[data[b][n]] for b, n in enumerate(lens)]))
        for b, n in enumerate(lens):
            check_row(out[b], refs[b][n : n + 1], mode, 1, atol)
        # the same 3-token chunk length for every row over different pasts (4 / 10 / 6): GQA
        # takes it only with the query_seqlens input (onnxruntime >= 1.32)
        chunk = np.array([data[b][n + 1 : n + 4] for b, n in enumerate(lens)])
        if not qlens:
            with pytest.raises(ValueError, match="query_seqlens"):
                r.step(chunk, keep=3)
            continue
        out = r.step(np.array([data[b][n + 1 : n + 4] for b, n in enumerate(lens)]), keep=3)
        for b, n in enumerate(lens):
            check_row(out[b], refs[b][n + 1 : n + 4], mode, 3, atol)


def test_batch_ragged_chunks_need_query_seqlens(build, hf_model) -> None:
    """Rows adding different numbers of tokens over a past (one decodes while another
    prefills a new turn) need the explicit query_seqlens input; idle rows (0) stay intact."""
    data = seqs(3, 20, seed=5)
    refs = [ref_logits(hf_model, s) for s in data]
    for mode in MODES:
        r = runner(build(bits=0, logits=mode, query_seqlens_input=True), 3)
        past = [4, 7, 2]
        ids = np.zeros((3, 7), np.int64)
        for b, n in enumerate(past):
            ids[b, :n] = data[b][:n]
        r.step(ids, new_lens=past)
        new = [1, 4, 0]  # decode, 4-token turn, idle
        ids = np.zeros((3, 4), np.int64)
        for b, (p, n) in enumerate(zip(past, new, strict=True)):
            ids[b, :n] = data[b][p : p + n]
        out = r.step(ids, new_lens=new, keep=1)
        for b, (p, n) in enumerate(zip(past, new, strict=True)):
            if n:
                check_row(out[b], refs[b][p : p + n], mode, 1, FP32_ATOL)
        # the idle row resumes where it stopped
        out = r.step(np.array([[data[0][5]], [data[1][11]], [data[2][2]]]), new_lens=[1, 1, 1])
        for b, p in enumerate((5, 11, 2)):
            check_row(out[b], refs[b][p : p + 1], mode, 1, FP32_ATOL)
    plain = runner(build(bits=0), 2)
    plain.step(np.array(seqs(2, 3)))
    with pytest.raises(ValueError, match="query_seqlens"):
        plain.step(np.array([[1, 2], [3, 0]]), new_lens=[2, 1])


def test_prefill_each_row_into_batch_buffer(build, hf_model) -> None:
    """Continuous batching: prefill a new request alone into its row of the shared batch
    buffer (binding a pointer offset), then decode all rows together."""
    data = seqs(2, 16, seed=9)
    refs = [ref_logits(hf_model, s) for s in data]
    r = runner(build(bits=0), 2)
    r.step(np.array([data[0][:6]]), rows=slice(0, 1))
    r.step(np.array([data[1][:11]]), rows=slice(1, 2))
    for k in range(3):
        out = r.step(np.array([[data[0][6 + k]], [data[1][11 + k]]]))
        close(out[0], refs[0][6 + k : 7 + k], FP32_ATOL)
        close(out[1], refs[1][11 + k : 12 + k], FP32_ATOL)


# --------------------------------------------------------------------------- other checkpoints


@pytest.mark.parametrize("kind", ["qwen2-bias", "llama-untied-llama3-rope"])
def test_other_llama_family_checkpoints(kind: str, tmp_path: Path) -> None:
    """q/k/v biases (Qwen2), an untied LM head and llama3 rope scaling take other code paths."""
    torch.manual_seed(1)
    common = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": CAPACITY,
        "initializer_range": 0.1,
    }  # fmt: skip
    if kind == "qwen2-bias":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():  # HF initializes biases to zero: make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.5)
    else:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # fmt: skip
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_scaling=rope)
        model = transformers.LlamaForCausalLM(cfg)
    model.eval().save_pretrained(tmp_path / "hf")
    ids = seqs(1, 24, seed=2)[0]
    ref = ref_logits(model, ids)
    for bits, atol in ((0, FP32_ATOL), (8, INT8_ATOL)):
        res = fuse.run(
            FuseConfig(max_context=CAPACITY, bits=bits, logits="all"), tmp_path / "hf", tmp_path / f"o{bits}"
        )
        r = runner(res)
        check_row(r.step(np.array([ids[:20]]))[0], ref[:20], "all", 1, atol)
        check_row(r.step(np.array([ids[20:21]]))[0], ref[20:21], "all", 1, atol)
        check_row(r.step(np.array([ids[21:24]]))[0], ref[21:24], "all", 1, atol)
