"""Structured pruning on a tiny random Llama: loadable, right shapes, importance-driven, zero = identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from edge_llm.errors import ExportError
from export import prune
from tests.conftest import TRAIN_TEXT, build_tiny_hf


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("tiny4"), layers=4)


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        return model(ids).logits


def test_prune_by_zero_is_identical(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    report = prune.run(prune.PruneConfig(text=text_file, span=(0.0, 1.0)), tiny4, tmp_path / "p")
    assert report["parameters_after"] == report["parameters_before"]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(tiny4, ids), _logits(tmp_path / "p", ids))


def test_prune_shrinks_the_right_shapes_and_loads(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    cfg = prune.PruneConfig(
        layer_ratio=0.25,
        mlp_ratio=0.5,
        head_ratio=0.5,
        kv_ratio=0.5,
        multiple=8,
        text=text_file,
        span=(0.0, 1.0),
        calib_tokens=256,
        seq_len=64,
    )
    report = prune.run(cfg, tiny4, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (3, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (1, 1, 16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"))
    layer = model.model.layers[0]
    assert tuple(layer.mlp.gate_proj.weight.shape) == (64, 64)
    assert tuple(layer.mlp.down_proj.weight.shape) == (64, 64)
    assert tuple(layer.self_attn.q_proj.weight.shape) == (16, 64)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (16, 64)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (64, 16)
    assert report["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert report["parameters_after"] < report["parameters_before"]
    assert len(report["dropped_layers"]) == 1 and report["calibration"]["tokens"] == 256
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_layer_choice_follows_importance_not_index(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    """A layer made (nearly) the identity is the one dropped, by every method."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny4))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    src = tmp_path / "src"
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).write_bytes((tiny4 / name).read_bytes())
    for method in ("single", "block", "kl"):
        cfg = prune.PruneConfig(
            layer_ratio=0.25,
            layer_method=method,
            text=text_file,
            span=(0.0, 1.0),
            calib_tokens=128,
            seq_len=64,
        )
        report = prune.run(cfg, src, tmp_path / method)
        assert report["dropped_layers"] == [1], method
        assert min(report["layer_distance"]["single"]) == report["layer_distance"]["single"][1]
    kl = report["layer_kl"][0]["kl"]  # the last run: "kl"; the last layer is never tried
    assert set(kl) == {"0", "1", "2"} and min(kl, key=kl.__getitem__) == "1" and kl["1"] < 1e-3


def test_kl_choice_is_greedy_over_the_shortlist(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    """Two layers by KL: the second step tries only the shortlist, on top of the first drop."""
    cfg = prune.PruneConfig(
        layer_ratio=0.5, layer_method="kl", shortlist=2, text=text_file, span=(0.0, 1.0),
        calib_tokens=128, seq_len=64,
    )  # fmt: skip
    report = prune.run(cfg, tiny4, tmp_path / "p")
    first, second = report["layer_kl"]
    assert len(first["kl"]) == 3 and len(second["kl"]) == 2 and str(first["dropped"]) not in second["kl"]
    assert report["dropped_layers"] == sorted([first["dropped"], second["dropped"]])
    assert min(first["kl"].values()) <= min(second["kl"].values())  # removing more moves more
    with pytest.raises(ValueError, match="shortlist"):
        prune.PruneConfig(shortlist=0)


def test_mlp_channels_ranked_by_activation(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    """Channels whose down_proj columns are zero contribute nothing and are pruned first."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny4))
    dead = list(range(0, 128, 2))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "tokenizer.json").write_bytes((tiny4 / "tokenizer.json").read_bytes())
    cfg = prune.PruneConfig(mlp_ratio=0.5, multiple=8, text=text_file, span=(0.0, 1.0), calib_tokens=128)
    report = prune.run(cfg, src, tmp_path / "p")
    assert all(ch == list(range(1, 128, 2)) for ch in report["kept_mlp_channels"])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(src, ids), _logits(tmp_path / "p", ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [{"layer_ratio": 1.0}, {"mlp_ratio": -0.1}, {"head_ratio": 1.5}, {"span": (0.5, 0.2)}],
)
def test_impossible_ratio_rejected_by_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="prune"):
        prune.PruneConfig(**kwargs)


def test_ratio_the_model_cannot_take(tiny4: Path) -> None:
    with pytest.raises(Exception, match="leave no attention head"):
        prune.check_model(prune.PruneConfig(kv_ratio=0.9), tiny4)
    assert prune.check_model(prune.PruneConfig(layer_ratio=0.5), tiny4).layers == 2


def test_refit_brings_pruned_model_closer(tiny4: Path, text_file: Path, tmp_path: Path) -> None:
    """The least-squares refit of down_proj / o_proj lowers the error of the pruned model's
    logits on the calibration text, against plain slicing of the same channels and heads."""
    from tokenizers import Tokenizer

    base = dict(mlp_ratio=0.5, head_ratio=0.5, multiple=8, text=text_file, span=(0.0, 1.0), calib_tokens=512)
    plain = prune.run(prune.PruneConfig(reconstruct=False, **base), tiny4, tmp_path / "plain")
    refit = prune.run(prune.PruneConfig(**base), tiny4, tmp_path / "refit")
    assert plain["kept_mlp_channels"] == refit["kept_mlp_channels"]  # same choice, other weights
    tok = Tokenizer.from_file(str(tiny4 / "tokenizer.json"))
    ids = torch.tensor([tok.encode(" ".join(TRAIN_TEXT), add_special_tokens=False).ids[:128]])
    ref = _logits(tiny4, ids)
    err_plain = (_logits(tmp_path / "plain", ids) - ref).pow(2).mean()
    err_refit = (_logits(tmp_path / "refit", ids) - ref).pow(2).mean()
    assert err_refit < 0.9 * err_plain, (float(err_refit), float(err_plain))


def test_refit_is_the_least_squares_solution() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64)
    x[:, 5] = 0.5 * x[:, 0] - x[:, 2]  # a dropped channel the kept ones can stand in for
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 1, 2])
    fitted = prune.refit(w, x.T @ x, keep, damp=1e-9)
    best = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(fitted, best, atol=1e-6, rtol=1e-6)


def test_explicit_layers_drop_exactly_those_without_calibration(tiny4: Path, tmp_path: Path) -> None:
    """`layers` reuses a measured choice: those layers go, the rest are copied unchanged, and no
    calibration text is read (none is given)."""
    report = prune.run(prune.PruneConfig(layers=(2, 0)), tiny4, tmp_path / "p")
    assert report["dropped_layers"] == [0, 2] and "calibration" not in report
    src = AutoModelForCausalLM.from_pretrained(str(tiny4))
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"))
    assert len(out.model.layers) == 2
    for new, old in ((0, 1), (1, 3)):
        for name, p in out.model.layers[new].named_parameters():
            assert torch.equal(p, dict(src.model.layers[old].named_parameters())[name]), (new, name)
    with pytest.raises(ValueError, match="not both"):
        prune.PruneConfig(layers=(1,), layer_ratio=0.25)
    with pytest.raises(ValueError, match="distinct"):
        prune.PruneConfig(layers=(1, 1))
    with pytest.raises(ExportError, match=r"droppable layers are 0\.\.2"):  # the last layer stays
        prune.run(prune.PruneConfig(layers=(3,)), tiny4, tmp_path / "q")
