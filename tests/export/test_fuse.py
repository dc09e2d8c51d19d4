"""export.fuse against transformers on a tiny random Llama, driven by the runtime's own runner.

Every bundle here is written by the recipe (fuse -> the one quantizer -> bundle) and run through
`edge_llm.runner.SharedRunner`, the code that serves: (a) prefill from an empty cache, (b)
1-token decode, (c) a multi-token step over a past (chat continuation, speculative verify +
rollback), (d) batches whose rows hold different past lengths (ragged first prompts, decode,
uniform chunks, idle rows, per-row prefill into a slice of the batch buffer). fp32 must match to
1e-4; int8 with fp32 activations must match the same int8 weights dequantized to 1e-4; the
shipping int8 (int8 activations) to INT8_ATOL plus equal top-1.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edge_llm.errors import ContextLengthError  # noqa: E402
from edge_llm.runner import SharedRunner  # noqa: E402
from export import fuse, nbits  # noqa: E402
from export import recipe as recipe_mod  # noqa: E402
from export.fuse_check import shared_runner  # noqa: E402
from export.hf import TOKENIZER_FILES  # noqa: E402
from export.load import LoadConfig  # noqa: E402
from export.quantize import QuantizeConfig  # noqa: E402
from export.to_onnx import ToOnnxConfig  # noqa: E402

VOCAB, CAPACITY, BLOCK = 384, 64, 16
FP32_ATOL = 1e-4
# accuracy_level 4 also quantizes activations to int8 inside MatMulNBits. On this model (logits
# within about ±3) that costs up to ~0.07 against the fp32 model; 0.15 = 5% of the logit range
# leaves margin, while a wrong position, row or cache slot shows up as O(1) errors.
INT8_ATOL = 0.15
MODES = ("all", "last", "tail")


def _save(model: torch.nn.Module, out: Path, tokenizer_from: Path) -> Path:
    """The model as an HF folder with the shared tiny tokenizer (the bundle stage needs one)."""
    model.eval().save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="module")
def hf_dir(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CAPACITY,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tiny_llama"), tiny_hf)


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()


def int8_roundtrip(model: torch.nn.Module, block: int = BLOCK) -> torch.nn.Module:
    """`model` with every matrix replaced by the quantize stage's int8 encoding, decoded: what an
    int8 graph must compute exactly when its activations stay fp32 (accuracy_level 1). Weights are
    blocked along the input dimension (MatMul K; the tied table's hidden size) as nbits does."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                w = param.numpy().T  # [K, N] as the graph's MatMul holds it
                param.copy_(torch.from_numpy(nbits.encode_int8(w, block).dequantize().T.copy()))
    return model


@pytest.fixture(scope="module")
def hf_dequant(hf_dir: Path) -> torch.nn.Module:
    return int8_roundtrip(
        transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    )


# name -> (quantize config, reference model fixture, tolerance)
VARIANTS = {
    "fp32": (QuantizeConfig(mode="none"), "hf_model", FP32_ATOL),
    "int8-exact": (
        QuantizeConfig(mode="int8", block_size=BLOCK, accuracy_level=1, embeddings="int8"),
        "hf_dequant",
        FP32_ATOL,
    ),
    "int8": (QuantizeConfig(mode="int8", block_size=BLOCK), "hf_model", INT8_ATOL),
}


def export(hf: Path, out: Path, quant: QuantizeConfig, logits: str = "tail") -> Path:
    recipe = recipe_mod.Recipe(
        name="tiny-fused",
        load=LoadConfig(model=str(hf)),
        to_onnx=ToOnnxConfig(graph="fused", max_context=CAPACITY, logits=logits),  # type: ignore[arg-type]
        quantize=quant,
    )
    return recipe_mod.run(recipe, out)


@pytest.fixture(scope="module")
def build(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A runner factory: (quantize config, logits mode) -> the runtime's runner on that bundle."""
    bundles: dict[tuple[str, str], Path] = {}

    def _build(quant: QuantizeConfig = VARIANTS["fp32"][0], logits: str = "tail") -> SharedRunner:
        key = (repr(quant), logits)
        if key not in bundles:
            bundles[key] = export(hf_dir, tmp_path_factory.mktemp("fused") / "b", quant, logits)
        return shared_runner(bundles[key])

    return _build


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[QuantizeConfig, torch.nn.Module, float]:
    quant, ref, atol = VARIANTS[request.param]
    return quant, request.getfixturevalue(ref), atol


def ref_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """[len(ids), V] logits of one unpadded sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def seqs(n: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, length).tolist() for _ in range(n)]


def close(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max |diff| {err:.2e} > {atol:.0e}"


def step(r: SharedRunner, cache: Any, ids: list[list[int]], ref_new: list[np.ndarray], atol: float) -> None:
    """Run one step of equal-length chunks for every row and check each row against its reference
    logits for those tokens: every position where the graph returns them, else the last."""
    every = r.logits_kind != "last"
    out = r.forward(np.array(ids), cache, all_logits=every)
    for b, want in enumerate(ref_new):
        close(out[b] if every else out[b][None], want if every else want[-1:], atol)


# --------------------------------------------------------------------------- graph shape


def test_fused_graph_is_fp32_and_the_quantizer_writes_nbits(build, hf_dir: Path, tmp_path: Path) -> None:
    res = fuse.run(fuse.FuseConfig(max_context=CAPACITY), hf_dir, tmp_path / "f")
    assert res.inputs[:2] == ("input_ids", "attention_mask")
    assert res.inputs[2:4] == ("past_key_values.0.key", "past_key_values.0.value")
    assert res.outputs[:3] == ("logits", "present.0.key", "present.0.value")
    assert res.op_counts["GroupQueryAttention"] == 2
    assert res.op_counts["MatMul"] == 2 * 4 and res.op_counts["Gemm"] == 1  # tied head reads the table
    assert res.op_counts["SkipSimplifiedLayerNormalization"] == 4
    assert "MatMulNBits" not in res.op_counts and "GatherBlockQuantized" not in res.op_counts
    assert res.data_path.stat().st_size > res.weight_bytes * 0.9  # weights are external
    r = build(VARIANTS["int8"][0])
    graph = onnx.load(str(r.bundle.graph_path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops
    kv = next(i for i in r.session.get_inputs() if i.name == "past_key_values.0.key")
    assert kv.shape[1:] == [2, "max_context", 16]


# --------------------------------------------------------------------------- (a) (b) (c)


def test_prefill_decode_continue(build, variant) -> None:
    quant, model, atol = variant
    ids = seqs(1, 16)[0]
    ref = ref_logits(model, ids)
    for mode in MODES:
        r = build(quant, mode)
        cache = r.empty(1)
        step(r, cache, [ids[:7]], [ref[:7]], atol)  # (a) prefill 7 tokens from an empty cache
        step(r, cache, [ids[7:8]], [ref[7:8]], atol)  # (b) one-token decode
        step(r, cache, [ids[8:12]], [ref[8:12]], atol)  # (c) a 4-token chunk over the past
        # rollback: reject 2 of the 4 drafts, continue from position 10 with other tokens
        r.truncate(cache, 10)
        alt = [*ids[:10], 5, 6, 7]
        step(r, cache, [alt[10:13]], [ref_logits(model, alt)[10:13]], atol)
        assert int(cache.lengths[0]) == 13


def test_int8_close_to_fp32(build) -> None:
    """Quantization error on its own: same inputs through the fp32 and int8 bundles."""
    ids = np.array(seqs(4, 16, seed=3))
    fp32, int8 = build(VARIANTS["fp32"][0], "all"), build(VARIANTS["int8"][0], "all")
    fp = fp32.forward(ids, fp32.empty(4), all_logits=True)
    q = int8.forward(ids, int8.empty(4), all_logits=True)
    close(q, fp, INT8_ATOL)
    assert (q.argmax(-1) == fp.argmax(-1)).mean() >= 0.9


def test_greedy_matches_transformers(build, hf_model) -> None:
    prompt = seqs(1, 5, seed=7)[0]
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    r = build()
    cache = r.empty(1)
    got, logits = list(prompt), r.forward(np.array([prompt]), cache)
    for _ in range(12):
        got.append(int(logits[0].argmax()))
        logits = r.forward(np.array([[got[-1]]]), cache)
    assert got == want[0].tolist()


def test_context_full_is_refused(build) -> None:
    r = build()
    cache = r.empty(1, 8)
    r.forward(np.array([seqs(1, 6)[0]]), cache)
    with pytest.raises(ContextLengthError, match="context full"):
        r.forward(np.array([seqs(1, 3)[0]]), cache)


# --------------------------------------------------------------------------- (d) batches


def test_batch_rows_with_different_past(build, variant) -> None:
    quant, model, atol = variant
    data = seqs(3, 20, seed=11)
    refs = [ref_logits(model, s) for s in data]
    lens = [3, 9, 5]
    for mode in MODES:
        r = build(quant, mode)
        cache = r.empty(3)
        # ragged first prompts, right padded: row b holds lens[b] real tokens; last-token logits
        ids = np.zeros((3, max(lens)), np.int64)
        for b, n in enumerate(lens):
            ids[b, :n] = data[b][:n]
        out = r.forward_rows(ids, cache, 0, counts=np.array(lens))
        for b, n in enumerate(lens):
            close(out[b], refs[b][n - 1], atol)
        assert cache.lengths.tolist() == lens
        # continuous-batching decode: one token per row, pasts 3 / 9 / 5
        decode = [[data[b][n]] for b, n in enumerate(lens)]
        step(r, cache, decode, [refs[b][n : n + 1] for b, n in enumerate(lens)], atol)
        # The same 3-token chunk for every row over different pasts: GQA takes that only with its
        # query_seqlens input (onnxruntime >= 1.32), which the portable graph leaves out. The
        # runtime never makes this step (a new turn and speculative verification run one row).
        chunks = [data[b][n + 1 : n + 4] for b, n in enumerate(lens)]
        with pytest.raises(Exception, match="batch_size must be 1"):
            step(r, cache, chunks, [refs[b][n + 1 : n + 4] for b, n in enumerate(lens)], atol)


def test_idle_rows_and_ragged_steps_over_a_past(build, hf_model) -> None:
    """An idle row (advance False) keeps its cache while the others decode; ragged counts over a
    past are refused (the graph reads them only for empty rows)."""
    data = seqs(3, 20, seed=5)
    refs = [ref_logits(hf_model, s) for s in data]
    r = build()
    cache = r.empty(3)
    r.forward(np.array([s[:4] for s in data]), cache)
    idle = np.array([True, False, True])
    out = r.forward_rows(np.array([[data[0][4]], [0], [data[2][4]]]), cache, 0, advance=idle)
    close(out[0], refs[0][4], FP32_ATOL)
    close(out[2], refs[2][4], FP32_ATOL)
    assert cache.lengths.tolist() == [5, 4, 5]
    out = r.forward_rows(np.array([[data[1][4]]]), cache, 1)  # the idle row resumes where it stopped
    close(out[0], refs[1][4], FP32_ATOL)
    with pytest.raises(ValueError, match="ragged rows"):
        r.forward_rows(np.array([[1, 2], [3, 0], [4, 5]]), cache, 0, counts=np.array([2, 1, 2]))


def test_prefill_each_row_into_batch_buffer(build, hf_model) -> None:
    """Continuous batching: prefill a new request alone into its row of the shared batch
    buffer (binding a pointer offset), then decode all rows together."""
    data = seqs(2, 16, seed=9)
    refs = [ref_logits(hf_model, s) for s in data]
    r = build()
    cache = r.empty(2)
    r.forward_rows(np.array([data[0][:6]]), cache, 0)
    r.forward_rows(np.array([data[1][:11]]), cache, 1)
    for k in range(3):
        out = r.forward(np.array([[data[0][6 + k]], [data[1][11 + k]]]), cache)
        close(out[0], refs[0][6 + k], FP32_ATOL)
        close(out[1], refs[1][11 + k], FP32_ATOL)


# --------------------------------------------------------------------------- other checkpoints


@pytest.mark.parametrize("kind", ["qwen2-bias", "llama-untied-llama3-rope"])
def test_other_llama_family_checkpoints(kind: str, tiny_hf: Path, tmp_path: Path) -> None:
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
    hf = _save(model, tmp_path / "hf", tiny_hf)
    ids = seqs(1, 24, seed=2)[0]
    ref = ref_logits(model, ids)
    for name, atol in (("fp32", FP32_ATOL), ("int8", INT8_ATOL)):
        r = shared_runner(export(hf, tmp_path / name, VARIANTS[name][0], "all"))
        cache = r.empty(1)
        step(r, cache, [ids[:20]], [ref[:20]], atol)
        step(r, cache, [ids[20:21]], [ref[20:21]], atol)
        step(r, cache, [ids[21:24]], [ref[21:24]], atol)


# --------------------------------------------------------------------------- the grid quantizer


def on_q4_1_grid(w: np.ndarray, block: int = 32) -> np.ndarray:
    """A [K, N] matrix of GGUF Q4_1 values near `w`: per block of 32 along K, d * q + m with q in
    0..15 (what a Q4_1 GGUF dequantizes to), using every code so the grid is recognisable."""
    k, n = w.shape
    b = w.T.reshape(n, k // block, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)  # GGUF stores fp16 scales
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m) / d), 0, 15)
    q[..., 0], q[..., 1] = 0, 15  # both ends present: the block's range is the grid's
    return (d * q + m).reshape(n, k).T.astype(np.float32)


def test_grid4_encodes_a_q4_1_grid_losslessly_and_falls_back_off_grid() -> None:
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    grid = on_q4_1_grid(w)
    enc = nbits.encode_grid4(grid, 32)
    assert enc is not None and enc.bits == 4 and enc.block_min is not None
    assert enc.packed.shape == (24, 2, 16)  # two 4-bit codes per byte
    np.testing.assert_allclose(enc.dequantize(), grid, rtol=0, atol=1e-6)
    assert nbits.weight_error(grid, enc)["max_abs"] < 1e-6
    assert nbits.encode_grid4(w, 32) is None  # off the grid: not 4-bit
    assert nbits.encode_auto(w, 32).bits == 8 and nbits.encode_auto(grid, 32).bits == 4


def test_grid_mode_keeps_q4_1_weights_exactly(hf_dir: Path, tmp_path: Path) -> None:
    """A model whose matrices sit on a Q4_1 grid (a GGUF Q4_1 source): mode "grid" writes them as
    4-bit codes + block offsets and, with fp32 activations, computes what the fp32 bundle does."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(on_q4_1_grid(param.numpy().T).T.copy()))
    hf = _save(model, tmp_path / "hf", hf_dir)
    grid_cfg = QuantizeConfig(mode="grid", block_size=32, accuracy_level=1, embeddings="fp32")
    grid = export(hf, tmp_path / "grid", grid_cfg, "all")
    fp32 = shared_runner(export(hf, tmp_path / "fp32", QuantizeConfig(mode="none"), "all"))
    q4 = shared_runner(grid)
    method = q4.bundle.quantization
    assert method["mode"] == "grid" and method["bits"] == [4] and method["worst_max_abs"] < 1e-5
    ids = np.array(seqs(2, 20, seed=4))
    want = fp32.forward(ids, fp32.empty(2), all_logits=True)
    close(q4.forward(ids, q4.empty(2), all_logits=True), want, 1e-3)
    close(want[0], ref_logits(model, ids[0].tolist()), FP32_ATOL)
