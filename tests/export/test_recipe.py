"""Recipes: bad ones fail before any work; a prune+distill+int8 recipe writes a bundle with its report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from edge_llm.errors import ConfigError, ExportError
from export import recipe as recipe_mod
from tests.conftest import TRAIN_TEXT, build_tiny_hf

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(body)
    return path


T = "text = 't.txt'\n"  # a text path for the sections that read text (never opened: they fail first)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("name = 'x'\n[quantize]\nmode = 'int8'\nblok_size = 32\n", "unknown key.*blok_size"),
        ("[quantize]\nblock_size = '32'\n", "quantize.block_size: expected an integer"),
        ("[quantize]\nmode = 'int4'\n", "quantize.mode"),
        ("[prune]\nlayer_ratio = 1.2\n", "prune.layer_ratio must be in"),
        ("[distill]\ntokens = 0\n", "distill: tokens"),
        (f"[prune]\nspan = [0.0, 0.5]\n{T}[evaluate]\nspan = [0.0, 0.1]\n{T}", "held-out"),
        (f"[distill]\n{T}[evaluate]\nspan = [0.05, 0.2]\n{T}", "overlaps distill.span"),
        ("[load]\nmodel = 3\n", "load.model: expected str"),
        (f"[distill]\nchat_tokens = 10\n{T}[evaluate]\nchat_tokens = 10\nchat_seed = 0\n{T}", "chat_seed 0"),
        (
            f"[distill]\nchat_tokens = 10\n{T}[evaluate]\nqa = 'configs/qa/general-v1.jsonl'\n{T}",
            "set distill.exclude_qa",
        ),
        ("[evaluate]\nspan = [0.0, 0.1]\n", "evaluate.text: give the text file"),
        ("[prune]\nlayer_ratio = 0.5\n", "prune.text: give the text file"),
        ("[trim_vocab]\nsize = 1024\n", "trim_vocab.text: give the text file"),
        (f"[trim_vocab]\nspan = [0.0, 0.5]\n{T}[evaluate]\nspan = [0.0, 0.1]\n{T}", "trim_vocab.span"),
        ("[quantize]\nmode = 'qdq'\n[to_onnx]\ngraph = 'optimum'\n", "quantize.calib_text"),
        ("[fuse]\nkv_cache = 'int8'\n", "fuse.calib_text"),
    ],
)
def test_bad_recipe_fails_with_a_clear_message(tmp_path: Path, body: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe_mod.load_recipe(_write(tmp_path, body))


def test_shipped_recipes_parse() -> None:
    plain = recipe_mod.load_recipe(REPO / "configs/recipes/smollm2-int8.toml")
    pruned = recipe_mod.load_recipe(REPO / "configs/recipes/smollm2-pruned-int8.toml")
    assert plain.prune is None and plain.distill is None and plain.quantize.mode == "int8"
    assert plain.fuse is not None and plain.fuse.kv_cache == "both" and plain.fuse.query_seqlens
    assert pruned.prune is not None and pruned.distill is not None and pruned.evaluate is not None
    assert pruned.trim_vocab is not None and pruned.trim_vocab.size < 49152
    assert pruned.distill.questions is not None and pruned.distill.exclude_qa is not None
    npu = recipe_mod.load_recipe(REPO / "configs/recipes/smollm2-qdq-npu.toml")
    assert npu.quantize.mode == "qdq" and npu.quantize.activation_bits == 16
    assert npu.static is not None and npu.static.past_length == 512
    # The recipes that speculate pad their attention (greedy speculation = plain decoding); the
    # pruned one has no draft (and was chosen unpadded when a padded graph without query_seqlens
    # could not batch); the static NPU graphs are optimum graphs, which [fuse] does not touch.
    draft = recipe_mod.load_recipe(REPO / "configs/recipes/smollm2-int8-draft.toml")
    for r in (plain, draft):
        assert r.to_onnx.graph == "fused" and r.fuse is not None and r.fuse.pad_query_row
    assert pruned.fuse is not None and not pruned.fuse.pad_query_row and not pruned.fuse.query_seqlens
    assert npu.fuse is None


def test_ratio_the_model_cannot_take_fails_before_pruning(
    tiny_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import prune

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("prune ran")

    monkeypatch.setattr(prune, "run", never)
    body = f"[load]\nmodel = '{tiny_hf}'\n[prune]\nkv_ratio = 0.9\ntext = 'unread.txt'\n"
    with pytest.raises(ExportError, match="leave no attention head"):
        recipe_mod.run(recipe_mod.load_recipe(_write(tmp_path, body)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(TRAIN_TEXT * 3), encoding="utf-8")
    return path


def test_pruned_recipe_writes_bundle_with_report_and_caches_stages(
    tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = build_tiny_hf(tmp_path / "hf", layers=4)
    body = f"""
name = "tiny-pruned"
[load]
model = "{hf}"
[prune]
layer_ratio = 0.25
mlp_ratio = 0.5
multiple = 8
text = "{text_file}"
span = [0.3, 1.0]
calib_tokens = 256
seq_len = 64
[distill]
text = "{text_file}"
span = [0.3, 1.0]
tokens = 1024
seq_len = 32
batch = 4
grad_accum = 2
lr = 3e-3
threads = 1
chat_tokens = 128
chat_max_answer = 8
[quantize]
mode = "int8"
[evaluate]
text = "{text_file}"
span = [0.0, 0.3]
max_tokens = 256
context = 64
stride = 32
speed_tokens = 4
speed_prompt = 8
speed_runs = 1
chat_tokens = 64
chat_max_answer = 8
"""
    recipe = recipe_mod.load_recipe(_write(tmp_path, body))
    out = recipe_mod.run(recipe, tmp_path / "bundle")
    for name in ("report.json", "report.md", "report.png", "bundle.json", "model.onnx"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    names = [s["stage"] for s in report["stages"]]
    assert names == [
        "load", "evaluate_load", "prune", "evaluate_prune", "distill", "evaluate_distill",
        "to_onnx", "quantize", "bundle", "evaluate_bundle", "report",
    ]  # fmt: skip
    assert set(report["evaluations"]) == {"load", "prune", "distill", "bundle"}
    final = report["evaluations"]["bundle"]
    assert final["text"]["span"] == [0.0, 0.3] and final["text"]["stride"] == 32
    assert final["parameters"] < report["evaluations"]["load"]["parameters"]
    assert final["decode_tok_s"] > 0 and 0 <= final["top1_agreement"] <= 1
    assert final["chat_turns"] >= 1 and 0 <= final["chat_top1_agreement"] <= 1
    distilled = next(s for s in report["stages"] if s["stage"] == "distill")
    assert distilled["text"]["chat_tokens"] >= 128
    md = (out / "report.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    assert "chat turns the teacher wrote (seed 1)" in md
    manifest = json.loads((out / "bundle.json").read_text())
    assert "report.json" in manifest["files"]
    # One truth for the graph: the copied recipe holds no layout of its own.
    assert manifest["graph"]["kv_layout"] == "shared" and manifest["graph"]["logits"] == "tail"
    assert set(manifest["recipe"]["bundle"]) == {"name", "context_length"}
    # report.md's quantization facts agree with its table: the worst tensor's own max-abs.
    quant = manifest["quantization"]
    errors = report["quantization"]["errors"]
    assert quant["worst_max_abs"] == errors[quant["worst_weight"]]["max_abs"]
    assert quant["max_abs"] == max(e["max_abs"] for e in errors.values())
    assert f"| {quant['worst_weight']} |" in md

    # The same recipe again: every stage comes from the cache, the bundle's evaluation too.
    rerun = recipe_mod.run(recipe, tmp_path / "b1", progress=True)
    stages = {s["stage"]: s for s in json.loads((rerun / "report.json").read_text())["stages"]}
    assert all(s["cached"] for n, s in stages.items() if n not in ("bundle", "report")), stages
    assert stages["evaluate_bundle"]["perplexity"] == final["perplexity"]
    assert json.loads((rerun / "report.json").read_text())["evaluations"]["bundle"]["model"] == str(rerun)
    lines = capsys.readouterr().err
    assert "export: evaluate_bundle" in lines and "export: quantize" in lines and "cached" in lines

    # A changed later stage reuses every earlier one.
    again = recipe_mod.run(replace(recipe, quantize=replace(recipe.quantize, mode="none")), tmp_path / "b2")
    stages = {s["stage"]: s for s in json.loads((again / "report.json").read_text())["stages"]}
    assert stages["load"]["cached"] and stages["prune"]["cached"] and stages["distill"]["cached"]
    assert stages["to_onnx"]["cached"] and not stages["quantize"]["cached"]
    assert stages["evaluate_distill"]["cached"] and not stages["evaluate_bundle"]["cached"]


def test_hf_model_runs_only_the_hf_stages_under_the_full_runs_keys(tmp_path: Path, text_file: Path) -> None:
    """`hf_model` stops before ONNX; a whole run of the same recipe then finds its prune stage
    cached (same key), and `layers = [...]` in TOML is the dropped set."""
    hf = build_tiny_hf(tmp_path / "hf", layers=4)
    body = f"""
[load]
model = "{hf}"
[prune]
layers = [1]
text = "{text_file}"
[quantize]
mode = "none"
"""
    recipe = recipe_mod.load_recipe(_write(tmp_path, body))
    assert recipe.prune is not None and recipe.prune.layers == (1,)
    folder = recipe_mod.hf_model(recipe)
    assert json.loads((folder / "prune.json").read_text())["dropped_layers"] == [1]
    assert not list(folder.glob("*.onnx"))
    out = recipe_mod.run(recipe, tmp_path / "bundle")
    stages = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert stages["prune"]["cached"] and not stages["to_onnx"]["cached"]


def test_recipe_interrupted_mid_distillation_resumes(
    tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from export import distill

    hf = build_tiny_hf(tmp_path / "hf", layers=2, seed=3)
    body = f"""
[load]
model = "{hf}"
[prune]
mlp_ratio = 0.5
multiple = 8
text = "{text_file}"
span = [0.3, 1.0]
calib_tokens = 128
[distill]
text = "{text_file}"
span = [0.3, 1.0]
tokens = 1024
seq_len = 32
batch = 4
grad_accum = 1
checkpoint_every = 3
threads = 1
[quantize]
mode = "none"
"""
    recipe = recipe_mod.load_recipe(_write(tmp_path, body))
    real = distill._checkpoint

    def interrupt(*args: object) -> None:
        real(*args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        recipe_mod.run(recipe, tmp_path / "out")
    monkeypatch.setattr(distill, "_checkpoint", real)
    out = recipe_mod.run(recipe, tmp_path / "out")
    stages = {s["stage"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
    assert stages["prune"]["cached"] and not stages["distill"]["cached"]
    assert stages["distill"]["steps"] == 8
    from export.cache import cache_root

    reports = [json.loads(p.read_text()) for p in (cache_root() / "stages").glob("distill-*/distill.json")]
    assert any(r["resumed_at_steps"] == [3] and r["steps"] == 8 for r in reports)
