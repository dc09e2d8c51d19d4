"""`[fuse] pad_query_row`: every GroupQueryAttention node gets a dummy query row, so a plain
1-token decode takes the kernel path a speculative verify takes and greedy speculation gives
plain decoding's tokens, token for token, without `[runtime] pad_decode` (issue 17).

Cause (benchmarks/README.md): GQA's CPU kernel computes a lone query row on another path than
several rows, a last-bit difference that MatMulNBits' int8 activations (accuracy_level 4)
amplify. The dummy's KV lands one past the row: the bundle records `graph.kv_spare = 1` and the
runner's KV buffers hold one spare position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.exact_decode import decode_verify_gap
from edge_llm.board import RunnerOptions
from edge_llm.bundle import KV_SPARE_RUNTIME, load_bundle, version_tuple
from edge_llm.engine import Engine, Slot
from edge_llm.errors import BundleError, ContextLengthError
from edge_llm.sampling import SamplingParams
from tests.conftest import export_bundle, fuse_every_variant, run_python, tiny_draft_config
from tests.edge_llm.test_ort_versions import PROBE, PYTHONS
from tests.edge_llm.test_pad_decode import assert_lookup_speculation_keeps_plain_tokens

RAGGED_ORT = version_tuple(ort.__version__) >= (1, 32)
PROMPT = "The capital of France is"
# (max_batch, kv_cache) -> the graph the runner loads: portable, query_seqlens, int8-KV portable
GRAPHS = [
    pytest.param(1, "fp32", "model.onnx", id="portable"),
    pytest.param(
        2,
        "fp32",
        "model.ragged.onnx",
        id="ragged",
        marks=pytest.mark.skipif(not RAGGED_ORT, reason="query_seqlens needs onnxruntime >= 1.32"),
    ),
    pytest.param(1, "int8", "model.kv8.onnx", id="kv8"),
]


def _engine(bundle: Path, max_batch: int = 1, kv_cache: str = "auto", **options: object) -> Engine:
    opts = {"threads": 1, "max_batch": max_batch, "kv_cache": kv_cache, "speculation": "off", **options}
    return Engine.load(bundle, RunnerOptions(**opts))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def padded_draft(tiny_hf: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """int8 fused bundle with a trained draft, its main graph padded (what smollm2-int8-draft
    exports: [fuse] pad_query_row without the query_seqlens variants)."""
    from export.variants import FuseOptions

    out = tmp_path_factory.mktemp("bundles") / "tiny-draft-padded"
    fuse = FuseOptions(query_seqlens=False, pad_query_row=True)
    return export_bundle(tiny_hf, out, "int8", "fused", fuse=fuse, draft=tiny_draft_config(tiny_text))


@pytest.fixture(scope="module")
def unpadded_twin(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_fused_padded exported without [fuse] pad_query_row: the same weights and KV scales."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-unpadded"
    return export_bundle(tiny_hf, out, "int8", "fused", fuse=fuse_every_variant(tmp_path_factory))


def test_every_graph_is_padded_and_the_bundle_says_so(tiny_fused_padded: Path, tiny_fused_int8: Path) -> None:
    meta = json.loads((tiny_fused_padded / "bundle.json").read_text())
    assert meta["graph"]["kv_spare"] == 1
    assert load_bundle(tiny_fused_int8).graph.kv_spare == 0  # unpadded (and older) bundles
    files = ["model.onnx", *meta["graph"]["variants"]]
    assert len(files) == 4
    for name in files:
        graph = onnx.load(str(tiny_fused_padded / name), load_external_data=False).graph
        gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        fed = {n.output[0] for n in graph.node if n.op_type == "GatherND"}
        assert len(gqa) == 2 and all(n.input[0] in fed for n in gqa), name
    # The portable graph still loads on the oldest onnxruntime the bundle claims.
    assert meta["requirements"]["onnxruntime"] == "1.23.2"


def test_a_runtime_that_ignores_kv_spare_refuses_the_padded_bundle(
    tiny_fused_padded: Path, unpadded_twin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runtime before KV_SPARE_RUNTIME keeps no spare KV position and would overrun its buffer
    (an onnxruntime error) when a sequence fills it; OTA brings new bundles to old runtimes, so
    the padded bundle requires the newer runtime, and the old one refuses it at load in one line."""
    padded = json.loads((tiny_fused_padded / "bundle.json").read_text())["requirements"]
    assert padded["edge_llm"] == KV_SPARE_RUNTIME == "0.2.0"
    assert load_bundle(tiny_fused_padded).requirements.edge_llm == "0.2.0"
    # An unpadded bundle still loads on runtimes that predate `requirements.edge_llm`.
    assert "edge_llm" not in json.loads((unpadded_twin / "bundle.json").read_text())["requirements"]
    monkeypatch.setattr("edge_llm.bundle.__version__", "0.1.0")
    with pytest.raises(BundleError) as refused:
        load_bundle(tiny_fused_padded)
    message = "this bundle needs edge-llm ≥ 0.2.0 (found 0.1.0): update the runtime or re-export"
    assert str(refused.value).endswith(message) and "\n" not in str(refused.value)
    assert load_bundle(unpadded_twin).graph.kv_spare == 0


@pytest.mark.parametrize(("rows", "kv", "graph"), GRAPHS)
def test_plain_decode_equals_every_verify_row_bit_for_bit(
    tiny_fused_padded: Path, rows: int, kv: str, graph: str
) -> None:
    engine = _engine(tiny_fused_padded, rows, kv)
    assert engine.runner.graph_name == graph and not engine.options.pad_decode
    assert decode_verify_gap(engine) == 0.0


# Padded vs unpadded logits. Prefill is bit-exact; a 1-token decode is not with the fp32 KV:
# the unpadded graph takes GQA's lone-row path (what the padding is for), a last-bit difference
# that the int8 activations of MatMulNBits round to a step (measured: 4.9e-4 on logits of size
# ~5; 0.0 with the int8 KV). A wrong position or rotary row is off by far more.
PAD_TOLERANCE = 2e-3


def _agree(padded: np.ndarray, plain: np.ndarray, gaps: list[float]) -> None:
    assert padded.shape == plain.shape
    gaps.append(float(np.abs(padded - plain).max()))
    np.testing.assert_allclose(padded, plain, rtol=0, atol=PAD_TOLERANCE)


@pytest.mark.parametrize(
    ("rows", "kv", "graph"),
    [
        *GRAPHS,
        pytest.param(
            2,
            "int8",
            "model.kv8.ragged.onnx",
            id="kv8-ragged",
            marks=pytest.mark.skipif(not RAGGED_ORT, reason="query_seqlens needs onnxruntime >= 1.32"),
        ),
    ],
)
def test_padded_logits_equal_unpadded_logits(
    tiny_fused_padded: Path, unpadded_twin: Path, rows: int, kv: str, graph: str
) -> None:
    """The dummy query row must not change a real row's logits: prefill (every position),
    1-token decode steps and two ragged rows sharing a cache give the unpadded graph's logits.
    Comparing decode with verify on the padded graph alone cannot see a position or rotary
    mistake that hits both alike; this comparison does."""
    runners = [_engine(b, rows, kv).runner for b in (tiny_fused_padded, unpadded_twin)]
    assert [r.graph_name for r in runners] == [graph, graph] and [r.kv_spare for r in runners] == [1, 0]
    rng = np.random.default_rng(1)
    gaps: list[float] = []
    # One sequence: a prompt with logits for every position, then greedy 1-token decode steps.
    caches = [r.empty(1) for r in runners]
    prompt = rng.integers(3, 380, (1, 40))
    out = [r.forward(prompt, c, all_logits=True) for r, c in zip(runners, caches, strict=True)]
    _agree(*out, gaps)
    for _ in range(8):
        token = np.array([[int(out[0][0, -1].argmax())]])
        out = [r.forward(token, c, all_logits=True) for r, c in zip(runners, caches, strict=True)]
        _agree(*out, gaps)
    # Two rows of different lengths in one cache: a ragged first prompt (empty rows: any graph).
    caches = [r.empty(2) for r in runners]
    tokens, counts = rng.integers(3, 380, (2, 24)), np.array([24, 13])
    _agree(*[r.forward_rows(tokens, c, 0, counts=counts) for r, c in zip(runners, caches, strict=True)], gaps)
    lengths = [24, 13]
    # Over a past, several rows need the query_seqlens graph once padded: the portable GQA
    # refuses batch > 1 with S > 1 over a past (the runner's batching is handled apart).
    if runners[0].ragged:
        for _ in range(6):  # 1-token decode steps
            tokens = rng.integers(3, 380, (2, 1))
            _agree(*[r.forward(tokens, c) for r, c in zip(runners, caches, strict=True)], gaps)
        tokens, counts = rng.integers(3, 380, (2, 3)), np.array([3, 1])  # a verify beside a decode
        _agree(
            *[r.forward_rows(tokens, c, 0, counts=counts) for r, c in zip(runners, caches, strict=True)], gaps
        )
        lengths = [33, 20]
    assert [c.lengths.tolist() for c in caches] == [lengths, lengths]
    print(f"{graph}: max |padded - unpadded| = {max(gaps):.3g}")


def test_without_the_option_plain_decode_and_verify_differ(tiny_fused_int8: Path) -> None:
    """The same check on the same weights exported without the option: the 1-token kernel path
    gives other logits (if a future onnxruntime makes them equal, the option is not needed)."""
    assert decode_verify_gap(_engine(tiny_fused_int8)) > 0


@pytest.mark.parametrize(("rows", "kv", "graph"), GRAPHS[:2])
def test_greedy_prompt_lookup_speculation_gives_plain_decodings_tokens(
    tiny_fused_padded: Path, rows: int, kv: str, graph: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _engine(tiny_fused_padded, rows, kv)
    spec = _engine(tiny_fused_padded, rows, kv, speculation="lookup", prompt_lookup=4)
    assert_lookup_speculation_keeps_plain_tokens(plain, spec, monkeypatch)


def test_greedy_trained_draft_speculation_gives_plain_decodings_tokens(padded_draft: Path) -> None:
    bundle = load_bundle(padded_draft)
    assert bundle.graph.kv_spare == 1 and bundle.graph.draft is not None and not bundle.graph.variants
    spec, plain = _engine(padded_draft, speculation="draft"), _engine(padded_draft)
    assert spec.draft is not None and decode_verify_gap(plain) == 0.0
    verifies = 0
    for text in (PROMPT, "def add(a, b):", "Small language models run on"):
        ids = plain.encode_request(prompt=text)
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        a, b = spec.complete(ids, params), plain.complete(ids, params)
        assert a.token_ids == b.token_ids
        verifies += a.usage.draft_verifies
    assert verifies > 0


def test_pad_decode_is_redundant_on_a_padded_graph(tiny_fused_padded: Path) -> None:
    """[runtime] pad_decode stays for bundles exported without the option; on a padded graph it
    does nothing (no [token, token] forward): same logits, same KV length."""
    ids = list(range(5, 25))
    out = []
    for pad in (False, True):
        engine = _engine(tiny_fused_padded, pad_decode=pad)
        slot = Slot()
        engine.prefill(ids, slot)
        out.append(engine.decode_one_token(7, slot))
        assert int(slot.cache.lengths[0]) == len(ids) + 1 and engine.last_pos == -1
    assert np.array_equal(*out)


@pytest.mark.parametrize(("rows", "kv", "graph"), GRAPHS)
def test_a_sequence_fills_max_context_exactly(
    tiny_fused_padded: Path, rows: int, kv: str, graph: str
) -> None:
    """The dummy row's KV needs position max_context: the buffers hold one spare position (and
    the graph's rotary table one more row), so a sequence may still fill max_context; one token
    more is the runtime's own "context full", not an onnxruntime error."""
    engine = _engine(tiny_fused_padded, rows, kv)
    full = engine.max_context
    assert full == 256
    rng = np.random.default_rng(0)
    slot = Slot()
    engine.prefill(rng.integers(3, 380, full - 3).tolist(), slot)
    assert slot.cache.capacity == full and slot.cache.buffers[0].shape[2] == full + 1
    verify = engine._forward_slot(np.array([[5, 6]]), slot, all_logits=True)  # a 2-token verify
    last = engine.decode_one_token(7, slot)
    assert int(slot.cache.lengths[0]) == full
    assert np.isfinite(verify).all() and np.isfinite(last).all()
    with pytest.raises(ContextLengthError, match="context full"):
        engine.decode_one_token(8, slot)
    whole = Slot()  # a prompt of exactly max_context in one forward
    assert np.isfinite(engine.prefill(rng.integers(3, 380, full).tolist(), whole)[0]).all()


@pytest.mark.skipif(not PYTHONS, reason="no other onnxruntime venv (.ci/run makes .venvs/ort-1.23.2)")
@pytest.mark.parametrize("python", PYTHONS)
def test_padded_graph_is_exact_on_other_ort(python: str, tiny_fused_padded: Path) -> None:
    """The portable padded graph on an older onnxruntime (1.23.2, the oldest claimed): plain
    decode still equals the verify forwards bit for bit."""
    res = run_python(python, str(PROBE), "--gap", str(tiny_fused_padded), "1", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) == 0.0
    version = run_python(python, "-c", "import onnxruntime; print(onnxruntime.__version__)").stdout.strip()
    assert version != ort.__version__, "the venv imports this suite's onnxruntime"


def test_padding_is_idempotent_and_refuses_other_graphs(tiny_fused_padded: Path, tiny_bundle: Path) -> None:
    from edge_llm.errors import ExportError
    from export.variants import pad_query_row

    model = onnx.load(str(tiny_fused_padded / "model.onnx"), load_external_data=False)
    before = len(model.graph.node)
    pad_query_row(model)  # padded already: unchanged
    assert len(model.graph.node) == before
    optimum = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    with pytest.raises(ExportError, match="not a fused graph"):
        pad_query_row(optimum)


def test_a_padded_graph_without_query_seqlens_serves_one_row_at_a_time(tiny_fused_padded: Path) -> None:
    """Its decode step is 2 query rows per sequence, which GroupQueryAttention without
    query_seqlens refuses for a batch of several rows over a past ("batch_size must be 1"): the
    engine says it cannot batch, so a max_batch-4 scheduler runs concurrent requests one after
    another and answers each as alone (before the mend every row of the first batched step failed)."""
    from edge_llm.protocol import Request
    from edge_llm.scheduler import Scheduler
    from tests.edge_llm.test_scheduler import Collector

    engine = _engine(tiny_fused_padded, max_batch=4, ragged=False)
    assert engine.runner.graph_name == "model.onnx" and not engine.can_batch
    solo = engine.complete(
        engine.encode_request(prompt=PROMPT), SamplingParams(max_tokens=6, ignore_eos=True)
    )
    s = Scheduler(engine, max_queue=8, max_inflight_per_client=8, max_batch=4)
    assert s.max_batch == 1
    s.start()
    try:
        sinks = [Collector() for _ in range(3)]
        for i, sink in enumerate(sinks):
            s.submit(Request(id=f"p{i}", prompt=PROMPT, max_tokens=6, ignore_eos=True), sink)
        finals = [sink.final() for sink in sinks]
    finally:
        s.close(grace_s=1)
    assert [(f.kind, f.message) for f in finals] == [("final", "")] * 3
    assert all(f.text == solo.text and f.usage["completion_tokens"] == 6 for f in finals)
