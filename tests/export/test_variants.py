"""export/variants.py ([fuse]): the int8-KV and query_seqlens graphs over one weight file, how the
bundle records them, and which one the runner picks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_llm.board import BoardConfig, RunnerOptions
from edge_llm.bundle import choose_graph, load_bundle, version_tuple
from edge_llm.engine import Engine
from edge_llm.errors import BundleError, ConfigError
from edge_llm.memory import plan_memory
from edge_llm.sampling import SamplingParams
from export.variants import FuseOptions

RAGGED_ORT = version_tuple(ort.__version__) >= (1, 32)


def test_manifest_records_variants_and_per_graph_onnxruntime(tiny_fused_variants: Path) -> None:
    meta = json.loads((tiny_fused_variants / "bundle.json").read_text())
    g, req = meta["graph"], meta["requirements"]
    assert g["kv_cache"] == "fp32"
    assert g["variants"] == {
        "model.ragged.onnx": {"kv_cache": "fp32", "query_seqlens": True},
        "model.kv8.onnx": {"kv_cache": "int8", "query_seqlens": False},
        "model.kv8.ragged.onnx": {"kv_cache": "int8", "query_seqlens": True},
    }
    # The portable main graph keeps the bundle loadable on older builds; the variants say theirs.
    assert req["onnxruntime"] == "1.23.2"
    assert req["graphs"] == {
        "model.ragged.onnx": "1.32.0",
        "model.kv8.onnx": "1.31.1",
        "model.kv8.ragged.onnx": "1.32.0",
    }
    # One weight file: every graph reads the same external data, none carries a copy.
    assert [f for f in meta["files"] if f.endswith(".data")] == ["model.onnx.data"]
    sizes = {f: m["bytes"] for f, m in meta["files"].items()}
    assert all(sizes[f] < sizes["model.onnx.data"] / 4 for f in g["variants"])


def test_choose_graph_by_kv_type_and_onnxruntime(tiny_fused_variants: Path) -> None:
    b = load_bundle(tiny_fused_variants)
    assert choose_graph(b, "auto", True, "1.32.0")[0] == "model.ragged.onnx"
    assert choose_graph(b, "auto", False, "1.32.0")[0] == "model.onnx"
    assert choose_graph(b, "int8", True, "1.32.0")[0] == "model.kv8.ragged.onnx"
    assert choose_graph(b, "fp32", True, "1.31.1")[0] == "model.onnx"  # no query_seqlens there
    assert choose_graph(b, "int8", True, "1.31.1")[0] == "model.kv8.onnx"
    with pytest.raises(BundleError, match=r"needs onnxruntime ≥ 1\.31\.1"):
        choose_graph(b, "int8", True, "1.23.2")


def test_int8_kv_refused_where_the_bundle_has_none(tiny_fused: Path) -> None:
    with pytest.raises(BundleError, match=r"no graph with a int8 KV cache.*kv_cache"):
        Engine.load(tiny_fused, RunnerOptions(kv_cache="int8"))


@pytest.mark.skipif(not RAGGED_ORT, reason="query_seqlens needs onnxruntime >= 1.32")
def test_ragged_graph_gives_the_portable_graphs_tokens(tiny_fused_variants: Path) -> None:
    plain = Engine.load(tiny_fused_variants, RunnerOptions(ragged=False))
    ragged = Engine.load(tiny_fused_variants)
    assert (plain.runner.ragged, ragged.runner.ragged) == (False, True)
    ids = ragged.encode_request(prompt="The capital of France")
    p = SamplingParams(max_tokens=16, ignore_eos=True)
    assert ragged.complete(ids, p).token_ids == plain.complete(ids, p).token_ids
    a = plain.runner.forward(np.array([ids]), plain.runner.empty(), all_logits=True)
    b = ragged.runner.forward(np.array([ids]), ragged.runner.empty(), all_logits=True)
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.skipif(not RAGGED_ORT, reason="query_seqlens needs onnxruntime >= 1.32")
def test_a_single_stream_engine_takes_the_portable_graph(tiny_fused_variants: Path) -> None:
    """One row is never ragged: with max_batch 1 the runner loads the portable graph even with
    [runtime] ragged on (it decoded faster on 1.32); a batching engine loads the ragged one."""
    single = Engine.load(tiny_fused_variants, RunnerOptions(max_batch=1))
    batched = Engine.load(tiny_fused_variants, RunnerOptions(max_batch=2))
    assert (single.runner.graph_name, single.runner.ragged) == ("model.onnx", False)
    assert batched.runner.ragged and batched.runner.graph_name != "model.onnx"
    # generate / chat are single-stream (one KV row); serve batches with the profile's rows
    from edge_llm.cli import build_parser
    from edge_llm.commands.generate import load_engine

    args = build_parser().parse_args(["generate", "--bundle", str(tiny_fused_variants), "hi"])
    engine, _ = load_engine(args, single_stream=True)
    assert (engine.options.max_batch, engine.runner.graph_name) == (1, "model.onnx")
    engine, _ = load_engine(args)
    assert engine.options.max_batch == 8 and engine.runner.ragged


@pytest.mark.skipif(not RAGGED_ORT, reason="query_seqlens needs onnxruntime >= 1.32")
def test_ragged_rows_over_different_pasts(tiny_fused_variants: Path) -> None:
    """What the portable graph refuses (counts over a past, uniform chunks over unequal pasts)
    the ragged one runs, each row equal to the same tokens fed alone."""
    e = Engine.load(tiny_fused_variants)
    r = e.runner
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 300, 20).tolist() for _ in range(3)]
    alone = []
    for s in data:
        c = r.empty(1)
        alone.append(r.forward(np.array([s]), c, all_logits=True)[0])
    cache = r.empty(3)
    past = [3, 9, 5]
    r.forward_rows(np.array([s[:9] for s in data]), cache, 0, counts=np.array(past))
    new = [4, 1, 7]
    tokens = np.zeros((3, 7), np.int64)
    for b, (p, n) in enumerate(zip(past, new, strict=True)):
        tokens[b, :n] = data[b][p : p + n]
    out = r.forward_rows(tokens, cache, 0, counts=np.array(new))
    for b, (p, n) in enumerate(zip(past, new, strict=True)):
        assert np.abs(out[b] - alone[b][p + n - 1]).max() < 1e-4
    assert cache.lengths.tolist() == [7, 10, 12]


def test_int8_kv_quarter_memory_close_logits(tiny_fused_variants: Path) -> None:
    fp32 = Engine.load(tiny_fused_variants, RunnerOptions(kv_cache="fp32"))
    int8 = Engine.load(tiny_fused_variants, RunnerOptions(kv_cache="int8"))
    assert int8.runner.kv_dtype == np.int8 and fp32.runner.kv_dtype == np.float32
    a_cache, b_cache = fp32.runner.empty(1), int8.runner.empty(1)
    assert sum(b.nbytes for b in b_cache.buffers) * 4 == sum(b.nbytes for b in a_cache.buffers)
    ids = fp32.encode_request(prompt="Small language models run on embedded boards")
    # token by token, so every position's attention reads the (rounded) cache
    a = np.stack([fp32.runner.forward(np.array([[t]]), a_cache)[0] for t in ids])
    b = np.stack([int8.runner.forward(np.array([[t]]), b_cache)[0] for t in ids])
    err = np.abs(a - b).max()
    assert 0 < err < 0.05 * (a.max() - a.min())  # rounded, but close


def test_memory_plan_sizes_kv_by_the_chosen_type(tiny_fused_variants: Path) -> None:
    b = load_bundle(tiny_fused_variants)
    board = BoardConfig()
    fp32 = plan_memory(b, board, 0)
    int8 = plan_memory(b, dataclasses.replace(board, runtime=RunnerOptions(kv_cache="int8")), 0)
    assert int8.kv_token_kib * 4 == fp32.kv_token_kib
    assert int8.kv_row_mb < fp32.kv_row_mb / 3


def test_fuse_options_checked() -> None:
    with pytest.raises(ValueError, match="calib_text"):
        FuseOptions(kv_cache="int8")
    with pytest.raises(ValueError, match="kv_cache"):
        FuseOptions(kv_cache="fp16")  # type: ignore[arg-type]
    from edge_llm.config import from_dict
    from export.recipe import Recipe

    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Recipe, {"fuse": {"kv_cahce": "int8"}})
    with pytest.raises(ConfigError, match="fused graph"):
        from_dict(Recipe, {"to_onnx": {"graph": "optimum"}, "fuse": {}})
    t = "../shared/data/wikitext-2/valid.txt"
    with pytest.raises(ConfigError, match=r"fuse\.calib_span overlaps"):
        from_dict(
            Recipe,
            {
                "fuse": {"kv_cache": "int8", "calib_text": t, "calib_span": [0.0, 0.5]},
                "evaluate": {"text": t, "span": [0.0, 0.1]},
            },
        )


def test_padded_variants_have_their_own_cache_key() -> None:
    """A padded stage output from before the `query_pad` switch (always padded) must not be
    reused for a recipe now: padding keys on PAD_VERSION; unpadded graphs did not change, so their
    key stays the plain chained one (their cached outputs stay valid)."""
    from export.cache import stable_key
    from export.stage import Artifact
    from export.variants import PAD_VERSION, STAGE

    art = Artifact("k" * 16, ("k",), {}, Path("t"), Path("h"))
    plain, padded = FuseOptions(), FuseOptions(pad_query_row=True)
    assert STAGE.key(plain, art) == stable_key(art.key, plain)
    assert STAGE.key(padded, art) == stable_key(art.key, padded, PAD_VERSION) != stable_key(art.key, padded)
    assert PAD_VERSION == 2
