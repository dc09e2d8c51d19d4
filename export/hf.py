"""Facts about a Hugging Face model folder that several stages need, read without loading it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# What a stage that writes a new HF folder (prune, distill) copies from its input unchanged.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "edge_llm_source.json",
    "vocab_map.json",  # a trimmed vocabulary's teacher ids (export/trim_vocab.py)
)


def parameters(hf_dir: Path) -> int:
    """Parameter count from the safetensors headers (no weights loaded; tied weights once)."""
    total, seen = 0, set()
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__" or name in seen:
                continue
            seen.add(name)
            count = 1
            for d in meta["shape"]:
                count *= d
            total += count
    return total


def weights_bytes(hf_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(hf_dir).glob("*.safetensors"))


# End-of-turn tokens that chat models emit besides their configured eos; stopping on them when
# they exist in the vocabulary is what llama.cpp and onnxruntime-genai do as well.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")


def vocabulary(hf_dir: Path) -> dict[str, int]:
    """Token text -> id from tokenizer.json (vocabulary and added tokens)."""
    tok = json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok.get("model", {}).get("vocab", {})
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    return {**(vocab if isinstance(vocab, dict) else {}), **added}


def special_ids(hf_dir: Path) -> tuple[int | None, list[int], int | None]:
    """(bos, eos ids, pad) as the configs give them; eos gains the end-of-turn tokens the
    vocabulary has (the runtime stops on all of them; the teacher's chats end on them too)."""
    hf_dir = Path(hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    lookup = vocabulary(hf_dir)
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    eos: list[int] = []
    for source in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if isinstance(i, int) and i not in eos and i != bos:
                eos.append(i)
    for name in END_OF_TURN:
        if name in lookup and lookup[name] not in eos and lookup[name] != bos:
            eos.append(lookup[name])
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    return bos, eos, pad if isinstance(pad, int) else None


def hf_tokenizer(hf_dir: Path, **kwargs: Any) -> Any:
    """transformers' tokenizer for `hf_dir` (or a GGUF's folder with gguf_file=...).

    legacy=True is what transformers uses when the argument is absent (SentencePiece-style
    Llama tokenizers keep their historical handling of text after special tokens); saying so
    keeps the same ids and replaces the warning it prints on every load otherwise."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), legacy=True, **kwargs)
