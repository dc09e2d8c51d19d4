"""Stage trim_vocab: an HF folder with a byte-level BPE tokenizer in, the same model over a
smaller vocabulary out (embedding and LM-head rows of the removed tokens gone, ids renumbered).

Why: SmolLM2-135M's tied 49,152 x 576 embedding is 21% of its parameters, and the LM head reads
all of it on every decode step, but English chat uses a small part of the vocabulary. Removing
rows costs no layer of the network; text that needs a removed token is still encoded, as the
smaller tokens it is merged from.

Which tokens are kept (`size` in all):
- every added/special token and every single-character token (the byte alphabet of byte-level
  BPE: any text stays encodable, and `decode(encode(text)) == text` for all text);
- the first `prior` tokens in id order (BPE vocabularies are in merge order, which follows the
  frequency in the tokenizer's own, much larger training corpus);
- then the tokens most frequent in the calibration text (a span of a text file disjoint from
  the evaluation span), then the rest in id order until `size` is reached.
A token is only kept with both halves of the merge that builds it (recursively), so every kept
token stays reachable. The tokenizer keeps exactly the merges among kept tokens; BPE applies the
same merges in the same order to text whose original tokens are all kept, so such text encodes to
the same tokens as before (renumbered): the model sees what it was trained on. Other text is
split into kept pieces the model rarely saw; distillation afterwards (export/distill.py) adapts it.

Out: model.safetensors / config.json with `vocab_size` = `size`, rewritten tokenizer.json,
tokenizer_config.json (ids of added tokens), config / generation_config special ids, and
`vocab_map.json` {"teacher_ids": [old id of new id 0, 1, ...], ...}: what distillation and
evaluation need to compare the model with the teacher (the runtime needs nothing of it). The
sentencepiece `tokenizer.model` a GGUF source carries is not copied: it would describe the old
vocabulary.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_llm.errors import ExportError
from export.hf import TOKENIZER_FILES
from export.stage import Artifact, Stage
from export.text import check_span, read_span

log = logging.getLogger(__name__)
MAP = "vocab_map.json"
REPORT = "trim_vocab.json"
STALE = ("tokenizer.model",)  # old-vocabulary files not carried over


@dataclass(frozen=True)
class TrimVocabConfig:
    size: int = 16384  # tokens kept, specials and byte alphabet included
    prior: int = 4096  # the first `prior` ids (merge order) always kept
    text: Path | None = None  # frequency source, required (export/text.py: resolution)
    span: tuple[float, float] = (0.1, 1.0)  # fraction of the file read (keep eval text out)
    multiple: int = 64  # size is rounded down to a multiple of this (row blocks of the head)

    def __post_init__(self) -> None:
        check_span(self.span, "trim_vocab.span")
        if self.size < 2 or self.prior < 0 or self.multiple < 1 or self.size < self.multiple:
            raise ValueError("trim_vocab: size >= 2, prior >= 0, 1 <= multiple <= size")


def read_tokenizer(path: Path) -> dict[str, Any]:
    """tokenizer.json (`path`: the file or its folder), checked to be byte-level BPE."""
    path = Path(path)
    path = path / "tokenizer.json" if path.is_dir() else path
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    pre = tok.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", [])}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or "ByteLevel" not in kinds:
        raise ExportError(f"trim_vocab: {path} is not a byte-level BPE tokenizer")
    return tok


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def choose(tok: dict[str, Any], counts: Counter, size: int, prior: int) -> list[int]:
    """The kept old ids, sorted (see the module docstring for the order they are chosen in)."""
    vocab: dict[str, int] = tok["model"]["vocab"]
    text_of = {i: t for t, i in vocab.items()}
    parents: dict[int, tuple[int, int]] = {}
    for a, b in _merges(tok["model"]):
        child = vocab.get(a + b)
        if child is not None and child not in parents and a in vocab and b in vocab:
            parents[child] = (vocab[a], vocab[b])  # the first (highest-priority) merge builds it
    keep: set[int] = {t["id"] for t in tok.get("added_tokens", [])}
    keep |= {i for t, i in vocab.items() if len(t) == 1}
    if len(keep) > size:
        raise ExportError(f"trim_vocab.size {size} is below the {len(keep)} special and byte tokens")

    def closure(i: int) -> set[int]:
        need, todo = set(), [i]
        while todo:
            j = todo.pop()
            if j in keep or j in need:
                continue
            need.add(j)
            todo.extend(parents.get(j, ()))
        return need

    def add(order: Any) -> None:
        for i in order:
            if len(keep) >= size:
                return
            need = closure(i)
            if len(keep) + len(need) <= size:
                keep.update(need)

    ranked = sorted(text_of)
    add(ranked[:prior])
    add(i for i, _ in counts.most_common())
    add(ranked)
    return sorted(keep)


def rewrite_tokenizer(tok: dict[str, Any], kept: list[int]) -> dict[str, Any]:
    """tokenizer.json over the kept tokens only, ids renumbered 0..len(kept)-1."""
    new_id = {old: new for new, old in enumerate(kept)}
    vocab = tok["model"]["vocab"]
    out = json.loads(json.dumps(tok))  # a deep copy
    out["model"]["vocab"] = {t: new_id[i] for t, i in vocab.items() if i in new_id}
    kept_text = out["model"]["vocab"]
    merges = [
        m
        for m in _merges(tok["model"])
        if m[0] in kept_text and m[1] in kept_text and m[0] + m[1] in kept_text
    ]
    as_str = bool(tok["model"]["merges"]) and isinstance(tok["model"]["merges"][0], str)
    out["model"]["merges"] = [" ".join(m) if as_str else list(m) for m in merges]
    for t in out.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    _remap_ids(out.get("post_processor"), new_id)
    return out


def _remap_ids(node: Any, new_id: dict[int, int]) -> None:
    """Special-token ids inside a post-processor (TemplateProcessing's "ids" lists)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "ids" and isinstance(v, list) and all(isinstance(i, int) for i in v):
                node[k] = [new_id[i] for i in v]
            else:
                _remap_ids(v, new_id)
    elif isinstance(node, list):
        for v in node:
            _remap_ids(v, new_id)


def _remap_config(path: Path, new_id: dict[int, int], size: int | None = None) -> None:
    if not path.is_file():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id"):
        v = cfg.get(k)
        if isinstance(v, int):
            cfg[k] = new_id.get(v)
        elif isinstance(v, list):
            cfg[k] = [new_id[i] for i in v if i in new_id]
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
    if size is not None:
        cfg["vocab_size"] = size
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run(config: TrimVocabConfig, hf_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the trimmed model of `hf_dir` into `out_dir`; returns (and writes) the report."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    tok = read_tokenizer(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    if (hf_dir / MAP).is_file():
        raise ExportError(f"trim_vocab: {hf_dir} is trimmed already (it has {MAP})")
    size = config.size - config.size % config.multiple
    if size >= hf_config["vocab_size"]:
        raise ExportError(
            f"trim_vocab.size {config.size} is not below the vocabulary ({hf_config['vocab_size']})"
        )
    text, where = read_span(config.text, config.span, "trim_vocab.text")
    old = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = old.encode(text, add_special_tokens=False).ids
    kept = choose(tok, Counter(ids), size, config.prior)
    new_id = {o: n for n, o in enumerate(kept)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name not in (*STALE, MAP) and (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)
    new_tok = rewrite_tokenizer(tok, kept)
    (out_dir / "tokenizer.json").write_text(json.dumps(new_tok, ensure_ascii=False))
    shutil.copy2(hf_dir / "config.json", out_dir / "config.json")
    _remap_config(out_dir / "config.json", new_id, len(kept))
    for name in ("generation_config.json", "tokenizer_config.json"):
        _remap_config(out_dir / name, new_id)
    # Weights: the rows of the kept tokens; a tied head is one tensor, an untied one is sliced too.
    rows = torch.tensor(kept)
    files = sorted(hf_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ExportError(f"trim_vocab: expected one model.safetensors in {hf_dir}, found {len(files)}")
    state = load_file(str(files[0]))
    sliced = []
    for name, w in state.items():
        if (
            w.dim() == 2
            and w.shape[0] == hf_config["vocab_size"]
            and name.endswith(("embed_tokens.weight", "lm_head.weight"))
        ):
            state[name] = w[rows].contiguous()
            sliced.append(name)
    if not sliced:
        raise ExportError(f"trim_vocab: no embedding of {hf_config['vocab_size']} rows in {files[0]}")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    new = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    new_ids = new.encode(text, add_special_tokens=False).ids
    after = sum(int(np.prod(w.shape)) for w in state.values())  # a tied head is stored once
    removed = (hf_config["vocab_size"] - len(kept)) * hf_config["hidden_size"] * len(sliced)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "text": where,
        "vocab_before": hf_config["vocab_size"],
        "vocab_after": len(kept),
        "sliced": sliced,
        "parameters_removed": removed,
        "parameters_after": after,
        "merges_before": len(tok["model"]["merges"]),
        "merges_after": len(new_tok["model"]["merges"]),
        # How much longer the calibration text gets in tokens (the cost of the smaller vocabulary).
        "text_tokens_before": len(ids),
        "text_tokens_after": len(new_ids),
        "tokens_kept_fraction": sum(i in new_id for i in ids) / max(1, len(ids)),
    }
    (out_dir / MAP).write_text(
        json.dumps({"teacher_ids": kept, "teacher_vocab_size": hf_config["vocab_size"]})
    )
    (out_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    log.info(
        "trim_vocab: %d -> %d tokens, text %d -> %d tokens",
        len(tok["model"]["vocab"]),
        len(kept),
        len(ids),
        len(new_ids),
    )
    return report


def teacher_ids(hf_or_bundle: Path) -> np.ndarray | None:
    """Old (teacher) id of each token id of a trimmed model or bundle; None when not trimmed."""
    path = Path(hf_or_bundle) / MAP
    if not path.is_file():
        return None
    return np.asarray(json.loads(path.read_text())["teacher_ids"], dtype=np.int64)


# --------------------------------------------------------------------------- as a recipe stage


def build(config: TrimVocabConfig, art: Artifact, out: Path, progress: bool) -> None:
    run(config, art.hf_dir, out)


def result(config: TrimVocabConfig, art: Artifact, folder: Path) -> Artifact:
    rep = json.loads((folder / REPORT).read_text())
    facts = {
        k: rep[k] for k in ("vocab_after", "parameters_after", "text_tokens_before", "text_tokens_after")
    }
    return replace(art, hf_dir=folder, facts=facts)


STAGE = Stage("trim_vocab", build, result)


def retokenize(ids: list[int], teacher_tok: Any, encode: Callable[[str], list[int]]) -> list[int]:
    """Teacher-vocabulary ids (special tokens included) as the trimmed tokenizer's `encode`
    encodes their text."""
    return encode(teacher_tok.decode(ids, skip_special_tokens=False))


def restrict_head(model: Any, ids: np.ndarray) -> None:
    """Make an HF causal LM's LM head score only the tokens `ids` (its logits come out in that
    order: the trimmed student's ids); the input embedding keeps the full vocabulary."""
    import torch

    head = model.get_output_embeddings()
    small = torch.nn.Linear(head.in_features, len(ids), bias=head.bias is not None)
    small = small.to(device=head.weight.device, dtype=head.weight.dtype)
    index = torch.from_numpy(ids).to(head.weight.device)
    with torch.no_grad():
        small.weight.copy_(head.weight[index])
        if head.bias is not None:
            small.bias.copy_(head.bias[index])
    small.weight.requires_grad_(False)
    model.config.tie_word_embeddings = False  # the input embedding must not follow the new head
    model.set_output_embeddings(small)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a token's text."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer_file: Path) -> np.ndarray | None:
    """UTF-8 bytes each token id stands for (added tokens: their text), for bits per byte; None
    for a tokenizer that is not byte-level BPE."""
    try:
        tok = read_tokenizer(tokenizer_file)
    except (ExportError, OSError, ValueError):
        return None
    alphabet = _byte_alphabet()
    pieces = {i: t for t, i in tok["model"]["vocab"].items()}
    pieces |= {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    out = np.zeros(max(pieces) + 1, dtype=np.int64)
    added = {t["id"] for t in tok.get("added_tokens", [])}
    for i, t in pieces.items():
        out[i] = len(t.encode()) if i in added else sum(1 if c in alphabet else len(c.encode()) for c in t)
    return out
