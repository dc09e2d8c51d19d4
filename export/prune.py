"""Stage 2, prune: an HF Llama-style folder + calibration text in, a smaller dense HF folder out.

Structured pruning, so the result is an ordinary (smaller) model that transformers, optimum and
the runtime handle like any other:
- depth: whole decoder layers are dropped. Importance is the angular distance between the hidden
  state entering and leaving the layers, averaged over calibration tokens: "block" (Gromov et
  al., 2024) drops the n consecutive layers whose input and output are most alike; "single"
  (ShortGPT's block influence) drops the n layers that individually change the state least;
  "kl" measures what each removal does to the output: greedily, one layer at a time, the layer
  whose removal moves the next-token distribution least (mean KL(model ‖ model without it) over
  the calibration tokens). A small hidden-state change can still matter to the answer: on
  SmolLM2 the angular pick kept 9.5% of the QA answers (issue 16), hence a measured choice.
- width: MLP intermediate channels. Channel j's importance is activation-aware:
  sqrt(E[x_j^2]) * ||W_down[:, j]|| with x the input of down_proj (the channel's contribution
  to the layer output), ranked per layer; the same count is kept in every layer (HF configs
  have one intermediate_size), rounded to a multiple of `multiple`.
- attention: query heads within each KV group (`head_ratio`) and whole KV groups (`kv_ratio`),
  ranked by sqrt(E[||o_h||^2]) * ||W_o[:, h]||_F with o_h the head's output entering o_proj.
All importances come from one pass over calibration text (a span of a text file disjoint from
the evaluation span). Ratios of 0 give a model numerically identical to the input.

Out: `out_dir` with model.safetensors, config.json, tokenizer files and `prune.json` (what was
removed, the importance scores, parameter counts before and after).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_llm.errors import ExportError
from export.hf import TOKENIZER_FILES
from export.stage import Artifact, Stage
from export.text import check_span, read_span

log = logging.getLogger(__name__)
REPORT = "prune.json"


@dataclass(frozen=True)
class PruneConfig:
    layer_ratio: float = 0.0  # fraction of decoder layers dropped (rounded to a whole layer)
    layer_method: Literal["block", "single", "kl"] = "block"
    # "kl": after the first pass over all layers, later greedy steps try only the `shortlist`
    # layers that cost least alone (each try is most of a forward; 30 per step cost too much).
    shortlist: int = 8
    # The layers to drop, by index (instead of layer_ratio / layer_method): a measured choice
    # reused, e.g. the first n steps of one greedy KL search (the report's `layer_kl`), so shapes
    # that differ elsewhere (vocabulary, width) do not pay the 10+ minute search each.
    layers: tuple[int, ...] = ()
    keep_last_layer: bool = True  # the last layer maps into the vocabulary space; never drop it
    mlp_ratio: float = 0.0  # fraction of MLP intermediate channels removed
    head_ratio: float = 0.0  # fraction of query heads removed within each KV group
    kv_ratio: float = 0.0  # fraction of KV groups (with their query heads) removed
    multiple: int = 32  # MLP width kept is a multiple of this (MatMulNBits blocks)
    # Refit down_proj / o_proj on the kept channels / heads by least squares on the calibration
    # activations, so the layer output stays as close as a linear map allows; `damp` is the
    # ridge term relative to the mean input energy.
    reconstruct: bool = True
    damp: float = 0.01
    text: Path | None = None  # calibration text, required when pruning (export/text.py: resolution)
    span: tuple[float, float] = (0.1, 1.0)  # fraction of the file used (keep eval text out)
    calib_tokens: int = 8192
    seq_len: int = 512

    def __post_init__(self) -> None:
        for name in ("layer_ratio", "mlp_ratio", "head_ratio", "kv_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"prune.{name} must be in [0, 1) (a fraction removed), not {value}")
        check_span(self.span, "prune.span")
        if self.layers and self.layer_ratio:
            raise ValueError("prune: give layers (indices) or layer_ratio, not both")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ValueError(f"prune.layers must be distinct indices >= 0, not {list(self.layers)}")
        if self.multiple < 1 or self.calib_tokens < 1 or self.seq_len < 2 or self.shortlist < 1:
            raise ValueError("prune: multiple >= 1, calib_tokens >= 1, seq_len >= 2, shortlist >= 1")
        if self.damp <= 0:
            raise ValueError(f"prune.damp must be > 0, not {self.damp}")

    @property
    def active(self) -> bool:
        return bool(self.layers) or self.measures

    @property
    def measures(self) -> bool:
        """Whether pruning needs the calibration pass (explicit layers alone do not)."""
        return any((self.layer_ratio, self.mlp_ratio, self.head_ratio, self.kv_ratio))


@dataclass(frozen=True)
class Plan:
    """How many of each structure remain; computed from the config and the model's config alone."""

    layers: int
    drop_layers: int
    intermediate: int
    kv_heads: int
    q_per_kv: int

    @property
    def heads(self) -> int:
        return self.kv_heads * self.q_per_kv


def plan(config: PruneConfig, hf_config: dict[str, Any]) -> Plan:
    """What remains after pruning; raises ValueError for a ratio the model cannot take."""
    layers = hf_config["num_hidden_layers"]
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    inter = hf_config["intermediate_size"]
    drop = len(config.layers) if config.layers else round(config.layer_ratio * layers)
    last = layers - 1 if config.keep_last_layer else layers
    if config.layers and max(config.layers) >= last:
        raise ValueError(
            f"prune.layers {list(config.layers)}: this model's droppable layers are 0..{last - 1}"
        )
    if layers - drop < 1 + int(config.keep_last_layer and drop > 0):
        raise ValueError(f"prune.layer_ratio {config.layer_ratio} leaves no layer of {layers}")
    keep_inter = inter
    if config.mlp_ratio:
        keep_inter = max(
            config.multiple, round(inter * (1 - config.mlp_ratio) / config.multiple) * config.multiple
        )
        keep_inter = min(keep_inter, inter)
    keep_kv = kv - round(config.kv_ratio * kv)
    q_per_kv = heads // kv
    keep_q = q_per_kv - round(config.head_ratio * q_per_kv)
    if keep_kv < 1 or keep_q < 1:
        raise ValueError(
            f"prune: kv_ratio {config.kv_ratio} / head_ratio {config.head_ratio} leave no attention head "
            f"({kv} KV groups x {q_per_kv} query heads)"
        )
    return Plan(layers - drop, drop, keep_inter, keep_kv, keep_q)


def check_model(config: PruneConfig, hf_dir: Path) -> Plan:
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    if config.active and hf_config.get("model_type") not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ExportError(f"prune: model_type {hf_config.get('model_type')!r} is not a Llama-style decoder")
    try:
        return plan(config, hf_config)
    except ValueError as exc:
        raise ExportError(str(exc)) from None


def angular(a: Any, b: Any) -> Any:
    """Mean over tokens of arccos(cos(a, b)) / pi, for [B, S, D] tensors."""
    import torch

    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return (torch.arccos(cos) / math.pi).mean()


def importance(
    model: Any,
    batches: list[Any],
    drop_layers: int,
    progress: bool = False,
    grams: tuple[bool, bool] = (False, False),
) -> dict[str, Any]:
    """One pass over the calibration batches: layer distances, MLP channel and head energies.

    `grams` = (mlp, attention): also keep the whole Gram matrix of that projection's input (for
    `refit`) instead of its diagonal; n x n per layer, so only where channels are removed.
    """
    import torch

    layers = model.model.layers
    n = len(layers)
    hidden: list[Any] = [None] * (n + 1)
    # Input energies of down_proj and o_proj: diag(X^T X) ranks channels and heads; the whole
    # Gram matrix, kept only where `grams` asks, is what the least-squares refit needs.
    mlp_energy = [_energy_sum(layer.mlp.down_proj.in_features, grams[0]) for layer in layers]
    attn_energy = [_energy_sum(layer.self_attn.o_proj.in_features, grams[1]) for layer in layers]
    hooks = []
    for i, layer in enumerate(layers):

        def layer_hook(_m: Any, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            hidden[i] = h_in.detach() if i == 0 else hidden[i]
            hidden[i + 1] = (out[0] if isinstance(out, tuple) else out).detach()

        def mlp_hook(_m: Any, args: Any, i: int = i) -> None:
            mlp_energy[i] += _energy(args[0], grams[0])

        def attn_hook(_m: Any, args: Any, i: int = i) -> None:
            attn_energy[i] += _energy(args[0], grams[1])

        hooks.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook))
    single = torch.zeros(n, dtype=torch.float64)
    block = torch.zeros(max(n - drop_layers + 1, 1), dtype=torch.float64)
    tokens = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(batches, desc="prune: calibration", unit="seq", dynamic_ncols=True)
    try:
        with torch.inference_mode():
            for ids in bar if bar is not None else batches:
                model(ids, use_cache=False)
                tokens += ids.numel()
                for i in range(n):
                    single[i] += angular(hidden[i], hidden[i + 1]) * ids.numel()
                if drop_layers:
                    for i in range(n - drop_layers + 1):
                        block[i] += angular(hidden[i], hidden[i + drop_layers]) * ids.numel()
    finally:
        for h in hooks:
            h.remove()
    mlp_score = [
        (_diag(g) / tokens).sqrt() * layer.mlp.down_proj.weight.detach().double().norm(dim=0)
        for g, layer in zip(mlp_energy, layers, strict=True)
    ]
    head_score = []
    for g, layer in zip(attn_energy, layers, strict=True):
        d = layer.self_attn.head_dim
        w = layer.self_attn.o_proj.weight.detach().double()
        energy = (_diag(g) / tokens).view(-1, d).sum(-1).sqrt()
        head_score.append(energy * w.view(w.shape[0], -1, d).pow(2).sum(dim=(0, 2)).sqrt())
    return {
        "tokens": tokens,
        "single": (single / tokens).tolist(),
        "block": (block / tokens).tolist() if drop_layers else [],
        "mlp": mlp_score,
        "heads": head_score,
        "mlp_energy": mlp_energy,
        "attn_energy": attn_energy,
    }


def _energy_sum(n: int, full: bool) -> Any:
    import torch

    return torch.zeros((n, n) if full else n, dtype=torch.float64)


def _energy(x: Any, full: bool) -> Any:
    """X^T X (full) or its diagonal over all tokens of a [B, S, n] activation, summed in float64."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if full:
        flat = flat.float()
        return (flat.T @ flat).double()
    return flat.double().pow(2).sum(0)


def _diag(energy: Any) -> Any:
    return energy.diagonal() if energy.dim() == 2 else energy


def refit(weight: Any, gram: Any, keep: Any, damp: float) -> Any:
    """Least-squares refit of a projection `weight` [out, n] that keeps only input columns `keep`.

    argmin_W' E||W x - W' x_k||^2 = W_k + W_d G_dk G_kk^-1 (d: the dropped columns): the kept
    weights plus the part of the dropped channels that the kept ones can linearly stand in for.
    The ridge (damp x mean input energy) shrinks only that correction, so dropping channels that
    contribute nothing changes nothing.
    """
    import torch

    n = weight.shape[1]
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    drop = mask.nonzero().flatten()
    g_kk = gram[keep][:, keep]
    ridge = damp * g_kk.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(keep), dtype=gram.dtype)
    carry = weight.double()[:, drop] @ gram[drop][:, keep]  # [out, k]
    fix = torch.linalg.solve(g_kk + ridge * eye, carry.T).T  # carry @ (G_kk + ridge I)^-1
    return (weight.double()[:, keep] + fix).to(weight.dtype)


def choose_layers(config: PruneConfig, scores: dict[str, Any], n: int, drop: int) -> list[int]:
    """Indices of the layers to drop."""
    if drop == 0:
        return []
    last = n - 1 if config.keep_last_layer else n
    if config.layer_method == "block":
        starts = [i for i in range(len(scores["block"])) if i + drop <= last]
        best = min(starts, key=lambda i: scores["block"][i])
        return list(range(best, best + drop))
    order = sorted(range(last), key=lambda i: scores["single"][i])
    return sorted(order[:drop])


def kl_layers(
    model: Any, batches: list[Any], drop: int, last: int, shortlist: int, progress: bool = False
) -> tuple[list[int], list[dict[str, Any]]]:
    """The `drop` layers (of the first `last`) to remove, chosen greedily by measured KL.

    Each step removes the layer whose removal, on top of those already removed, gives the
    smallest mean KL(full model ‖ pruned model) of the next-token distributions over all
    calibration tokens. A try re-runs only the layers after the tried one, from the hidden
    state entering it (kept from one pass of the current model). Returns the dropped layers
    (sorted) and each step's tried layers with their KL (the report's `layer_kl`).
    """
    import torch

    layers, norm, head = model.model.layers, model.model.norm, model.get_output_embeddings()
    kwargs: dict[str, Any] = {}

    def grab(_m: Any, args: Any, kw: Any) -> None:
        kwargs.update(kw)  # mask, positions, rotary embeddings: the same for every layer

    full_logp, per_batch = [], []
    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in batches:
                kwargs.clear()
                full_logp.append(torch.log_softmax(model(ids, use_cache=False).logits.float(), -1))
                per_batch.append((model.model.embed_tokens(ids), dict(kwargs)))
    finally:
        hook.remove()
    tokens = sum(ids.numel() for ids in batches)

    def run_from(h: Any, kw: dict, order: list[int]) -> Any:
        for j in order:
            h = layers[j](h, **kw)
            h = h[0] if isinstance(h, tuple) else h  # older transformers return a tuple
        return h

    dropped: list[int] = []
    steps: list[dict[str, Any]] = []
    first: dict[int, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=drop, desc="prune: layers by KL", unit="layer", dynamic_ncols=True)
    with torch.inference_mode():
        for _ in range(drop):
            kept = [i for i in range(len(layers)) if i not in dropped]
            pool = [i for i in kept if i < last]
            if first:  # later steps: the shortlist of the first step's cheapest layers
                pool = sorted(pool, key=first.__getitem__)[:shortlist]
            kl = dict.fromkeys(pool, 0.0)
            for (emb, kw), ref in zip(per_batch, full_logp, strict=True):
                h, entering = emb, {}
                for j in kept:  # the hidden state entering each kept layer, once per step
                    entering[j] = h
                    h = run_from(h, kw, [j])
                for c in pool:
                    out = run_from(entering[c], kw, [j for j in kept if j > c])
                    logp = torch.log_softmax(head(norm(out)).float(), -1)
                    kl[c] += float((ref.exp() * (ref - logp)).sum())
            kl = {c: v / tokens for c, v in kl.items()}
            if not first:
                first = dict(kl)
            best = min(kl, key=kl.__getitem__)
            dropped.append(best)
            steps.append({"dropped": best, "kl": {str(c): round(v, 5) for c, v in kl.items()}})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(dropped), steps


def run(config: PruneConfig, hf_dir: Path, out_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Prune the model in `hf_dir` into `out_dir`; returns (and writes) the prune report."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = check_model(config, hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    before = sum(p.numel() for p in model.parameters())
    report: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    }
    layers = model.model.layers
    n = len(layers)
    if config.measures:
        batches, where = calibration(config, hf_dir)
        grams = (
            config.reconstruct and target.intermediate < model.config.intermediate_size,
            config.reconstruct and target.heads < model.config.num_attention_heads,
        )
        scores = importance(model, batches, target.drop_layers, progress, grams)
        report["calibration"] = {**where, "tokens": scores["tokens"], "seq_len": config.seq_len}
    else:
        scores = None
    if config.layers:
        dropped = sorted(config.layers)
    elif scores and config.layer_method == "kl" and target.drop_layers:
        last = n - 1 if config.keep_last_layer else n
        dropped, report["layer_kl"] = kl_layers(
            model, batches, target.drop_layers, last, config.shortlist, progress
        )
    else:
        dropped = choose_layers(config, scores, n, target.drop_layers) if scores else []
    kept_layers = [i for i in range(n) if i not in dropped]
    state = model.state_dict()
    new_state: dict[str, Any] = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    kept_mlp: list[list[int]] = []
    kept_heads: list[list[int]] = []
    for new_i, old_i in enumerate(kept_layers):
        layer = layers[old_i]
        prefix = f"model.layers.{old_i}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        attn = layer.self_attn
        d = attn.head_dim
        q_idx, kv_idx = _heads(scores["heads"][old_i] if scores else None, target, model.config, d)
        ch = _channels(scores["mlp"][old_i] if scores else None, target.intermediate)
        kept_mlp.append(ch.tolist())
        kept_heads.append(q_idx.tolist())
        sub = _slice_layer(sub, ch, q_idx, kv_idx, d)
        if config.reconstruct and scores:
            if len(ch) < layer.mlp.down_proj.in_features:
                w = state[prefix + "mlp.down_proj.weight"]
                sub["mlp.down_proj.weight"] = refit(
                    w, scores["mlp_energy"][old_i], torch.from_numpy(ch), config.damp
                )
            if len(q_idx) < attn.o_proj.in_features // d:
                w = state[prefix + "self_attn.o_proj.weight"]
                rows = _rows(q_idx, d)
                sub["self_attn.o_proj.weight"] = refit(w, scores["attn_energy"][old_i], rows, config.damp)
        new_state.update({f"model.layers.{new_i}.{k}": v for k, v in sub.items()})
    new_config = AutoConfig.from_pretrained(str(hf_dir))
    new_config.num_hidden_layers = len(kept_layers)
    new_config.intermediate_size = target.intermediate
    new_config.num_attention_heads = target.heads
    new_config.num_key_value_heads = target.kv_heads
    new_config.head_dim = model.config.head_dim if hasattr(model.config, "head_dim") else d
    if isinstance(getattr(new_config, "layer_types", None), list):
        new_config.layer_types = [new_config.layer_types[i] for i in kept_layers]
    pruned = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    missing, unexpected = pruned.load_state_dict(new_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and new_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"prune: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    pruned.tie_weights()
    pruned.eval().save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copy2(Path(hf_dir) / name, out_dir / name)
    after = sum(p.numel() for p in pruned.parameters())
    report |= {
        "plan": asdict(target),
        "dropped_layers": dropped,
        "kept_mlp_channels": kept_mlp,
        "kept_query_heads": kept_heads,
        "parameters_before": before,
        "parameters_after": after,
        "parameter_reduction": 1 - after / before,
    }
    if scores:
        report["layer_distance"] = {"single": scores["single"], "block": scores["block"]}
    (out_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    log.info(
        "prune: %d -> %d parameters (%.1f%% fewer), dropped layers %s",
        before,
        after,
        100 * report["parameter_reduction"],
        dropped,
    )
    return report


def calibration(config: PruneConfig, hf_dir: Path) -> tuple[list[Any], dict[str, Any]]:
    import torch
    from tokenizers import Tokenizer

    text, where = read_span(config.text, config.span, "prune.text")
    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    ids = tok.encode(text[: config.calib_tokens * 12], add_special_tokens=False).ids[: config.calib_tokens]
    if len(ids) < 2:
        raise ExportError(f"prune: calibration span {config.span} of {where['file']} has no text")
    batches = [torch.tensor([ids[i : i + config.seq_len]]) for i in range(0, len(ids), config.seq_len)]
    return [b for b in batches if b.shape[1] > 1], where


def _channels(score: Any, keep: int) -> np.ndarray:
    if score is None or keep >= len(score):
        return np.arange(len(score) if score is not None else keep)
    return np.sort(np.argsort(-score.numpy(), kind="stable")[:keep])


def _heads(score: Any, target: Plan, cfg: Any, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept query heads (sorted, grouped by kept KV group) and kept KV groups."""
    kv = cfg.num_key_value_heads
    per = cfg.num_attention_heads // kv
    if score is None or (target.kv_heads == kv and target.q_per_kv == per):
        return np.arange(kv * per), np.arange(kv)
    s = score.numpy().reshape(kv, per)
    groups = np.sort(np.argsort(-s.sum(axis=1), kind="stable")[: target.kv_heads])
    q = [g * per + np.sort(np.argsort(-s[g], kind="stable")[: target.q_per_kv]) for g in groups]
    return np.concatenate(q), groups


def _rows(heads: np.ndarray, d: int) -> Any:
    import torch

    return torch.from_numpy((heads[:, None] * d + np.arange(d)[None, :]).reshape(-1))


def _slice_layer(
    sub: dict[str, Any], ch: np.ndarray, q: np.ndarray, kv: np.ndarray, d: int
) -> dict[str, Any]:
    import torch

    out = dict(sub)
    c = torch.from_numpy(ch)
    for name in ("mlp.gate_proj", "mlp.up_proj"):
        out[f"{name}.weight"] = sub[f"{name}.weight"][c].clone()
        if f"{name}.bias" in sub:
            out[f"{name}.bias"] = sub[f"{name}.bias"][c].clone()
    out["mlp.down_proj.weight"] = sub["mlp.down_proj.weight"][:, c].clone()
    qr, kr = _rows(q, d), _rows(kv, d)
    for name, rows in (("self_attn.q_proj", qr), ("self_attn.k_proj", kr), ("self_attn.v_proj", kr)):
        out[f"{name}.weight"] = sub[f"{name}.weight"][rows].clone()
        if f"{name}.bias" in sub:
            out[f"{name}.bias"] = sub[f"{name}.bias"][rows].clone()
    out["self_attn.o_proj.weight"] = sub["self_attn.o_proj.weight"][:, qr].clone()
    return out


# --------------------------------------------------------------------------- as a recipe stage


def build(config: PruneConfig, art: Artifact, out: Path, progress: bool) -> None:
    run(config, art.hf_dir, out, progress)


def result(config: PruneConfig, art: Artifact, folder: Path) -> Artifact:
    rep = json.loads((folder / REPORT).read_text())
    facts = {k: rep[k] for k in ("dropped_layers", "plan")}
    facts = {"parameters": rep["parameters_after"], **facts}
    return replace(art, hf_dir=folder, facts=facts)


STAGE = Stage("prune", build, result)
