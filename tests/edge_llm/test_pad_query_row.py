"""`[fuse] pad_query_row`: every GroupQueryAttention node gets a dummy query row behind the graph
input `query_pad`, which the runtime sets for forwards of one row: there a plain 1-token decode
takes the kernel path a speculative verify takes and greedy speculation gives plain decoding's
tokens, token for token, without `[runtime] pad_decode` (issue 17). Forwards of several rows
(batched decode steps, where no row speculates) run without the dummy: the unpadded graph's
logits bit for bit, and the portable graph batches.

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

from benchmarks.exact_decode import batched_then_alone, decode_verify_gap
from edge_llm import speculate
from edge_llm.board import RunnerOptions
from edge_llm.bundle import (
    KV_SPARE_RUNTIME,
    PAD_INPUT,
    PAD_SWITCH_RUNTIME,
    load_bundle,
    version_tuple,
    write_manifest,
)
from edge_llm.engine import Engine, Slot
from edge_llm.errors import BundleError, ContextLengthError
from edge_llm.sampling import SamplingParams
from tests.conftest import export_bundle, run_python, tiny_draft_config
from tests.edge_llm.test_ort_versions import PROBE, PYTHONS
from tests.edge_llm.test_pad_decode import assert_lookup_speculation_keeps_plain_tokens, drafts_from

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


def always_padded(bundle: Path, out: Path) -> Path:
    """A copy of padded `bundle` as exported before the switch (edge-llm 0.2.0): `query_pad` a
    constant 1 in every graph, so every forward has the dummy row; manifest and requirements to
    match. Old bundles like it are still in the field and must still load."""
    import shutil
    from dataclasses import replace

    shutil.copytree(bundle, out)
    for name in ["model.onnx", *load_bundle(bundle).graph.variants]:
        model = onnx.load(str(out / name), load_external_data=False)
        inputs = [i for i in model.graph.input if i.name != PAD_INPUT]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.int32), PAD_INPUT))
        onnx.save(model, str(out / name))
    old = load_bundle(out, verify=False)
    graph = replace(old.graph, inputs=tuple(i for i in old.graph.inputs if i != PAD_INPUT))
    requirements = replace(old.requirements, edge_llm=KV_SPARE_RUNTIME)
    write_manifest(replace(old, graph=graph, requirements=requirements))
    return out


def test_every_graph_is_padded_behind_the_switch_and_the_bundle_says_so(
    tiny_fused_padded: Path, tiny_fused_int8: Path
) -> None:
    meta = json.loads((tiny_fused_padded / "bundle.json").read_text())
    assert meta["graph"]["kv_spare"] == 1 and PAD_INPUT in meta["graph"]["inputs"]
    assert load_bundle(tiny_fused_int8).graph.kv_spare == 0  # unpadded (and older) bundles
    files = ["model.onnx", *meta["graph"]["variants"]]
    assert len(files) == 4
    for name in files:
        graph = onnx.load(str(tiny_fused_padded / name), load_external_data=False).graph
        gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        fed = {n.output[0] for n in graph.node if n.op_type == "GatherND"}
        assert len(gqa) == 2 and all(n.input[0] in fed for n in gqa), name
        switch = [i for i in graph.input if i.name == PAD_INPUT]
        assert len(switch) == 1 and PAD_INPUT not in {t.name for t in graph.initializer}, name
        assert switch[0].type.tensor_type.elem_type == onnx.TensorProto.INT32, name
        assert len(switch[0].type.tensor_type.shape.dim) == 0, name  # a scalar
    # The portable graph still loads on the oldest onnxruntime the bundle claims.
    assert meta["requirements"]["onnxruntime"] == "1.23.2"


def test_a_runtime_that_does_not_feed_the_switch_refuses_the_padded_bundle(
    tiny_fused_padded: Path,
    tiny_fused_unpadded: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A runtime before PAD_SWITCH_RUNTIME does not feed `query_pad` (onnxruntime: a missing
    input at the first forward), and one before KV_SPARE_RUNTIME keeps no spare KV position (an
    onnxruntime error when a sequence fills its buffer); OTA brings new bundles to old runtimes,
    so the padded bundle requires the newer runtime, and an old one refuses it at load in one
    line. A bundle padded before the switch still requires only KV_SPARE_RUNTIME."""
    padded = json.loads((tiny_fused_padded / "bundle.json").read_text())["requirements"]
    assert padded["edge_llm"] == PAD_SWITCH_RUNTIME == "0.3.0"
    assert load_bundle(tiny_fused_padded).requirements.edge_llm == "0.3.0"
    old = always_padded(tiny_fused_padded, tmp_path / "always-padded")
    assert load_bundle(old).requirements.edge_llm == KV_SPARE_RUNTIME == "0.2.0"
    # An unpadded bundle still loads on runtimes that predate `requirements.edge_llm`.
    assert "edge_llm" not in json.loads((tiny_fused_unpadded / "bundle.json").read_text())["requirements"]
    assert load_bundle(old).graph.kv_spare == 1 and load_bundle(tiny_fused_unpadded).graph.kv_spare == 0
    for version, needs, bundle in (("0.2.0", "0.3.0", tiny_fused_padded), ("0.1.0", "0.2.0", old)):
        monkeypatch.setattr("edge_llm.bundle.__version__", version)
        with pytest.raises(BundleError) as refused:
            load_bundle(bundle)
        message = f"this bundle needs edge-llm ≥ {needs} (found {version}): update the runtime or re-export"
        assert str(refused.value).endswith(message) and "\n" not in str(refused.value)


@pytest.mark.parametrize(("rows", "kv", "graph"), GRAPHS)
def test_plain_decode_equals_every_verify_row_bit_for_bit(
    tiny_fused_padded: Path, rows: int, kv: str, graph: str
) -> None:
    engine = _engine(tiny_fused_padded, rows, kv)
    assert engine.runner.graph_name == graph and not engine.options.pad_decode
    assert decode_verify_gap(engine) == 0.0


# Padded vs unpadded logits of one row (padded there). Prefill is bit-exact; a 1-token decode is
# not with the fp32 KV: the unpadded graph takes GQA's lone-row path (what the padding is for), a
# last-bit difference that the int8 activations of MatMulNBits round to a step (measured: 4.9e-4
# on logits of size ~5; 0.0 with the int8 KV). A wrong position or rotary row is off by far more.
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
    tiny_fused_padded: Path, tiny_fused_unpadded: Path, rows: int, kv: str, graph: str
) -> None:
    """The dummy query row must not change a real row's logits: one row's prefill (every
    position) and 1-token decode steps (padded) give the unpadded graph's logits; forwards of
    several rows (not padded: `query_pad` 0) give them bit for bit, on every graph. Comparing
    decode with verify on the padded graph alone cannot see a position or rotary mistake that
    hits both alike; this comparison does."""
    runners = [_engine(b, rows, kv).runner for b in (tiny_fused_padded, tiny_fused_unpadded)]
    assert [r.graph_name for r in runners] == [graph, graph] and [r.kv_spare for r in runners] == [1, 0]
    assert [r.pad_switch for r in runners] == [True, False] and all(r.batches for r in runners)
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
    # Two rows of different lengths in one cache: a ragged first prompt (empty rows: any graph),
    # then 1-token decode steps over the past: the batched steps, unpadded on every graph (the
    # portable GQA, padded, would refuse 2 query rows over a past for batch 2).
    caches = [r.empty(2) for r in runners]
    tokens, counts = rng.integers(3, 380, (2, 24)), np.array([24, 13])
    batched = [[r.forward_rows(tokens, c, 0, counts=counts) for r, c in zip(runners, caches, strict=True)]]
    for _ in range(6):
        tokens = rng.integers(3, 380, (2, 1))
        batched.append([r.forward(tokens, c) for r, c in zip(runners, caches, strict=True)])
    lengths = [30, 19]
    if runners[0].ragged:  # a verify beside a decode: rows of 3 and 1 new tokens over a past
        tokens, counts = rng.integers(3, 380, (2, 3)), np.array([3, 1])
        pair = zip(runners, caches, strict=True)
        batched.append([r.forward_rows(tokens, c, 0, counts=counts) for r, c in pair])
        lengths = [33, 20]
    for padded, plain in batched:
        assert np.array_equal(padded, plain)
    assert [c.lengths.tolist() for c in caches] == [lengths, lengths]
    print(f"{graph}: max |padded - unpadded| = {max(gaps):.3g} (one row), 0 (several rows)")


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


@pytest.mark.parametrize("switch", [True, False], ids=["switch", "always-padded"])
def test_the_portable_padded_graph_batches_unless_always_padded(
    tiny_fused_padded: Path, tmp_path: Path, switch: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """With the switch, a max_batch-4 scheduler on the portable graph (what onnxruntime < 1.32
    runs) batches concurrent requests: their steps run unpadded. A bundle padded before the
    switch decodes 2 query rows per sequence, which GroupQueryAttention without query_seqlens
    refuses for several rows over a past ("batch_size must be 1"): the engine says it cannot
    batch (with a warning), so the scheduler runs the requests one after another and answers
    each as alone (before the mend every row of the first batched step failed)."""
    from edge_llm.protocol import Request
    from edge_llm.scheduler import Scheduler
    from tests.edge_llm.test_scheduler import Collector

    bundle = tiny_fused_padded if switch else always_padded(tiny_fused_padded, tmp_path / "always-padded")
    engine = _engine(bundle, max_batch=4, ragged=False)
    assert engine.runner.graph_name == "model.onnx" and engine.can_batch == switch
    assert ("one sequence at a time" in caplog.text) != switch
    solo = engine.complete(
        engine.encode_request(prompt=PROMPT), SamplingParams(max_tokens=6, ignore_eos=True)
    )
    s = Scheduler(engine, max_queue=8, max_inflight_per_client=8, max_batch=4)
    assert s.max_batch == (4 if switch else 1)
    sinks = [Collector() for _ in range(3)]
    for i, sink in enumerate(sinks):  # queued before the worker starts: admitted together
        s.submit(Request(id=f"p{i}", prompt=PROMPT, max_tokens=6, ignore_eos=True), sink)
    s.start()
    try:
        finals = [sink.final() for sink in sinks]
    finally:
        s.close(grace_s=1)
    assert [(f.kind, f.message) for f in finals] == [("final", "")] * 3
    assert all(f.text == solo.text and f.usage["completion_tokens"] == 6 for f in finals)
    assert s.stats["peak_batch"] == (3 if switch else 1)


@pytest.mark.parametrize(("rows", "kv", "graph"), GRAPHS[:2])
def test_a_row_that_speculates_once_alone_keeps_plain_tokens_after_batched_steps(
    tiny_fused_padded: Path, rows: int, kv: str, graph: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What serve does (`batched_then_alone`): a long request shares unpadded batched steps with a
    short one, then runs alone, padded, and speculates (rows of a wider batch never do). Greedy
    prompt-lookup speculation gives plain decoding's tokens under the same schedule, token for
    token (benchmarks/exact_decode.py checks the same on SmolLM2)."""
    engines = [
        _engine(tiny_fused_padded, 2, kv, ragged=graph != "model.onnx", **spec)
        for spec in ({}, {"speculation": "lookup", "prompt_lookup": 4})
    ]
    shapes: list[tuple[int, int]] = []
    runs = []
    for engine in engines:
        assert engine.runner.graph_name == graph and engine.can_batch
        forward_rows = engine.runner.forward_rows

        def spy(tokens: np.ndarray, *a: object, _f: object = forward_rows, **k: object) -> np.ndarray:
            shapes.append(tokens.shape)
            return _f(tokens, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(engine.runner, "forward_rows", spy)
        ids = engine.encode_request(prompt=PROMPT)
        runs.append(batched_then_alone(engine, ids, SamplingParams(max_tokens=40, ignore_eos=True), 8))
        # The second (speculating) run drafts the plain run's tokens, every third one wrong.
        monkeypatch.setattr(speculate, "lookup_draft", drafts_from(list(runs[0].generated), len(ids)))
    plain, spec = runs
    assert spec.generated == plain.generated and len(plain.generated) == 40
    assert spec.verifies > 0 and spec.accepted > 0
    assert (2, 1) in shapes  # batched 1-token steps of both rows ...
    assert any(r == 1 and s > 2 for r, s in shapes)  # ... and verifies of the lone row


def test_pad_batches_pads_forwards_of_several_rows_as_before(tiny_fused_padded: Path, tmp_path: Path) -> None:
    """[runtime] pad_batches: batched steps padded too, the logits of a bundle padded before the
    switch bit for bit (and not those of the default, unpadded batched steps); on the portable
    graph padded rows cannot share a forward over a past, so it serves one row at a time."""
    old = always_padded(tiny_fused_padded, tmp_path / "always-padded")
    assert not _engine(tiny_fused_padded, 4, ragged=False, pad_batches=True).can_batch
    if not RAGGED_ORT:
        return
    engines = [
        _engine(tiny_fused_padded, 2, pad_batches=True),
        _engine(old, 2),
        _engine(tiny_fused_padded, 2),
    ]
    assert [e.runner.graph_name for e in engines] == ["model.ragged.onnx"] * 3
    rng = np.random.default_rng(2)
    caches = [e.runner.empty(2) for e in engines]
    tokens, counts = rng.integers(3, 380, (2, 24)), np.array([24, 13])
    for e, c in zip(engines, caches, strict=True):
        e.runner.forward_rows(tokens, c, 0, counts=counts)
    unequal = 0
    for _ in range(6):  # batched 1-token steps over the two pasts
        tokens = rng.integers(3, 380, (2, 1))
        padded, before, default = (e.runner.forward(tokens, c) for e, c in zip(engines, caches, strict=True))
        assert np.array_equal(padded, before)
        unequal += not np.array_equal(padded, default)
    assert unequal > 0  # fp32 KV: the unpadded 1-row path differs in the last bits
