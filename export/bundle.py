"""Stage 7, bundle: a quantized graph + the HF folder it came from in, a runtime bundle out.

Writes `model.onnx` (+ `model.onnx.data`), `tokenizer.json`, optional reports, and last
`bundle.json` (via `edge_llm.bundle.write_manifest`, which hashes every file). The manifest holds
everything the runtime needs so it never opens config.json or guesses: architecture, graph IO
and KV layout, token ids, chat template, quantization, source and recipe.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_llm import chat
from edge_llm.bundle import FORMAT_VERSION, load_bundle, write_manifest
from edge_llm.errors import ExportError
from export import targets
from export.to_onnx import graph_io

# End-of-turn tokens that chat models emit besides their configured eos; stopping on them when
# they exist in the vocabulary is what llama.cpp and onnxruntime-genai do as well.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>")


@dataclass(frozen=True)
class BundleConfig:
    name: str = "model"
    context_length: int = 0  # 0: the model's max_position_embeddings
    kv_layout: str = "concat"
    logits: str = "all"
    # kv_layout "static" (export/fix_shapes.py): the prefill graph beside the decode graph
    prefill_file: str = ""
    prefill_length: int = 0
    past_length: int = 0
    target: str = "cpu"  # export/targets.py TARGETS; recorded in bundle.json requirements


@dataclass(frozen=True)
class BundleInputs:
    graph: Path
    hf_dir: Path
    quantization: dict[str, Any]
    source: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)  # name in bundle -> file


def architecture(hf_config: dict[str, Any], parameters: int = 0, context_length: int = 0) -> dict[str, Any]:
    heads = hf_config["num_attention_heads"]
    return {
        "model_type": hf_config.get("model_type", "llama"),
        "num_layers": hf_config["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf_config.get("num_key_value_heads", heads),
        "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        "hidden_size": hf_config["hidden_size"],
        "vocab_size": hf_config["vocab_size"],
        "context_length": context_length or hf_config.get("max_position_embeddings", 2048),
        "parameters": parameters,
    }


def tokenizer_section(hf_dir: Path) -> dict[str, Any]:
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.exists() else {}
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    lookup = {**(vocab if isinstance(vocab, dict) else {}), **added}
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    eos: list[int] = []
    for source in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if isinstance(i, int) and i not in eos and i != bos:
                eos.append(i)
    for name in END_OF_TURN:
        if name in lookup and lookup[name] not in eos and lookup[name] != bos:
            eos.append(lookup[name])
    if not eos:
        raise ExportError(f"{hf_dir}: no end-of-sequence token id found in the config")
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    template = tcfg.get("chat_template")
    jinja = hf_dir / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    chat_format = None
    if template is not None:
        # The runtime renders chats from these plain strings when they reproduce the template
        # (then it needs no jinja2); the template stays in the manifest for other tools.
        text = {i: t for t, i in lookup.items()}
        specials = (text.get(bos, "") if bos is not None else "", text.get(eos[0], ""))
        fmt = chat.derive(chat.jinja_renderer(template, *specials))
        chat_format = fmt.to_dict() if fmt is not None else None
    return {
        "file": "tokenizer.json",
        "bos_id": bos,
        "eos_ids": eos,
        "pad_id": pad if isinstance(pad, int) else eos[0],
        "chat_template": template,
        "chat_format": chat_format,
        # Chat templates carry their own special tokens; only a template-less model gets a BOS.
        "add_bos": bool(template is None and tcfg.get("add_bos_token", False) and bos is not None),
    }


def run(config: BundleConfig, inputs: BundleInputs, out_dir: Path) -> Path:
    """Assemble the bundle folder `out_dir` (replaced if it exists) and verify it loads."""
    if out_dir.exists():
        if not (out_dir / "bundle.json").exists() and any(out_dir.iterdir()):
            raise ExportError(f"{out_dir}: exists, is not empty and is not a bundle; refusing to overwrite")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    graph_name = "model.onnx"
    shutil.copy2(inputs.graph, tmp / graph_name)
    data = inputs.graph.with_name(inputs.graph.name + ".data")
    if data.exists():
        shutil.copy2(data, tmp / (graph_name + ".data"))
    shutil.copy2(inputs.hf_dir / "tokenizer.json", tmp / "tokenizer.json")
    for name, path in inputs.extra_files.items():
        shutil.copy2(path, tmp / name)
    hf_config = json.loads((inputs.hf_dir / "config.json").read_text(encoding="utf-8"))
    graph_inputs, graph_outputs = graph_io(tmp / graph_name)
    manifest = {
        "name": config.name,
        "architecture": architecture(hf_config, _parameters(inputs.hf_dir), config.context_length),
        "graph": {
            "file": graph_name,
            "kv_layout": config.kv_layout,
            "logits": config.logits,
            "inputs": list(graph_inputs),
            "outputs": list(graph_outputs),
            **(
                {
                    "prefill_file": config.prefill_file,
                    "prefill_length": config.prefill_length,
                    "past_length": config.past_length,
                }
                if config.prefill_file
                else {}
            ),
        },
        "tokenizer": tokenizer_section(inputs.hf_dir),
        "quantization": inputs.quantization,
        "source": inputs.source,
        "recipe": inputs.recipe,
        "requirements": targets.requirements(sorted(tmp.glob("*.onnx")), config.target),
    }
    write_manifest(tmp, manifest)
    tmp.rename(out_dir)
    load_bundle(out_dir)  # what we wrote must be what the runtime accepts
    return out_dir


def _parameters(hf_dir: Path) -> int:
    """Parameter count from the safetensors headers (no weights loaded; tied weights once)."""
    import struct

    total, seen = 0, set()
    for f in sorted(hf_dir.glob("*.safetensors")):
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


__all__ = ["FORMAT_VERSION", "BundleConfig", "BundleInputs", "run"]
