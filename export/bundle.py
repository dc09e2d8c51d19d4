"""Stage 7, bundle: a quantized graph + the HF folder it came from in, a runtime bundle out.

Copies `model.onnx` (+ `model.onnx.data`, + a static bundle's prefill graph), `tokenizer.json` and
optional reports, then writes `bundle.json` from `edge_llm.bundle`'s own dataclasses
(`Bundle`, `Architecture`, `GraphSpec`, `TokenizerSpec`: the format is described there, once) via
`edge_llm.bundle.write_manifest`, which hashes every file. The manifest holds everything the
runtime needs so it never opens config.json or guesses: architecture, graph IO and KV layout,
token ids, chat template, quantization, source and recipe.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_llm import chat
from edge_llm.bundle import (
    EAGLE1_RUNTIME,
    FORMAT_VERSION,
    KV_SPARE_RUNTIME,
    PAD_INPUT,
    PAD_SWITCH_RUNTIME,
    Architecture,
    Bundle,
    GraphSpec,
    Requirements,
    TokenizerSpec,
    load_bundle,
    version_tuple,
    write_manifest,
)
from edge_llm.errors import ExportError
from export import hf, targets
from export.to_onnx import graph_io


@dataclass(frozen=True)
class BundleConfig:
    name: str = "model"  # "model": the recipe's name
    context_length: int = 0  # 0: what the graph serves (to_onnx.max_context / the model's)


@dataclass(frozen=True)
class BundleInputs:
    graph: Path
    hf_dir: Path
    # GraphSpec fields the graph's stages decided (kv_layout, logits, a static graph's
    # prefill_file / prefill_length / past_length); file and IO names are read from the graph.
    layout: dict[str, Any]
    quantization: dict[str, Any]
    source: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, Path] = field(default_factory=dict)  # name in bundle -> file
    target: str = "cpu"  # the recipe's [target] (export/targets.py): recorded in requirements


def architecture(hf_config: dict[str, Any], parameters: int = 0, context_length: int = 0) -> Architecture:
    heads = hf_config["num_attention_heads"]
    return Architecture(
        model_type=hf_config.get("model_type", "llama"),
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads", heads),
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        hidden_size=hf_config["hidden_size"],
        vocab_size=hf_config["vocab_size"],
        context_length=context_length or hf_config.get("max_position_embeddings", 2048),
        parameters=parameters,
    )


def tokenizer_section(hf_dir: Path) -> TokenizerSpec:
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    bos, eos, pad = hf.special_ids(hf_dir)
    if not eos:
        raise ExportError(f"{hf_dir}: no end-of-sequence token id found in the config")
    template = tcfg.get("chat_template")
    jinja = hf_dir / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    chat_format = None
    if template is not None:
        # The runtime renders chats from these plain strings when they reproduce the template
        # (then it needs no jinja2); the template stays in the manifest for other tools.
        text = {i: t for t, i in hf.vocabulary(hf_dir).items()}
        specials = (text.get(bos, "") if bos is not None else "", text.get(eos[0], ""))
        fmt = chat.derive(chat.jinja_renderer(template, *specials))
        chat_format = fmt.to_dict() if fmt is not None else None
    return TokenizerSpec(
        file="tokenizer.json",
        bos_id=bos,
        eos_ids=tuple(eos),
        pad_id=pad if pad is not None else eos[0],
        chat_template=template,
        chat_format=chat_format,
        # Chat templates carry their own special tokens; only a template-less model gets a BOS.
        add_bos=bool(template is None and tcfg.get("add_bos_token", False) and bos is not None),
    )


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
    # copy2 keeps the source's mode, and the quantizer writes model.onnx.data 0600: a bundle
    # built by one user could not be read by a service account. Bundles are not secret: 0644.
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    spec = {f.name for f in fields(GraphSpec)}
    unknown = set(inputs.layout) - spec
    if unknown:
        raise ExportError(f"bundle: graph layout keys {sorted(unknown)} are not GraphSpec fields")
    write_manifest(
        Bundle(
            path=tmp,
            format_version=FORMAT_VERSION,
            name=config.name,
            architecture=architecture(hf_config, hf.parameters(inputs.hf_dir), config.context_length),
            graph=GraphSpec(file=graph_name, inputs=graph_inputs, outputs=graph_outputs, **inputs.layout),
            tokenizer=tokenizer_section(inputs.hf_dir),
            quantization=inputs.quantization,
            source=inputs.source,
            recipe=inputs.recipe,
            requirements=Requirements(
                **_requirements_fields(
                    tmp,
                    inputs.target,
                    set(inputs.layout.get("contexts", {}).values()),
                    set(inputs.layout.get("variants", {})),
                ),
                # Runtimes before KV_SPARE_RUNTIME ignore graph.kv_spare and overrun the KV
                # buffer when a sequence fills it; runtimes before PAD_SWITCH_RUNTIME do not feed
                # the padded graph's switch, runtimes before EAGLE1_RUNTIME feed an eagle1 draft
                # as the stateless kind: they must refuse the bundle instead.
                edge_llm=runtime_needed(inputs.layout, graph_inputs),
            ),
            provider_options=targets.provider_options(inputs.target),
        )
    )
    tmp.rename(out_dir)
    load_bundle(out_dir)  # what we wrote must be what the runtime accepts
    return out_dir


__all__ = ["FORMAT_VERSION", "BundleConfig", "BundleInputs", "run"]


def _requirements_fields(
    folder: Path, target: str, contexts: set[str], variants: set[str] = frozenset()
) -> dict[str, Any]:
    """What the written graphs need (export/targets.py reads their ops), as Requirements fields.
    Compiled contexts are left out: only their provider's plugin loads them, and the plain graphs
    they came from (what CPU runs) set what onnxruntime the bundle needs. A variant graph that
    needs more is listed under `graphs` (the runtime skips it on older builds)."""
    graphs = [p for p in sorted(folder.glob("*.onnx")) if p.name not in contexts | variants]
    req = targets.requirements(graphs, target)
    ops, extra = set(req["contrib_ops"]), {}
    for name in sorted(variants):
        need = targets.requirements([folder / name], target)
        ops |= set(need["contrib_ops"])
        if version_tuple(need["onnxruntime"]) > version_tuple(req["onnxruntime"]):
            extra[name] = need["onnxruntime"]
    return {**req, "contrib_ops": tuple(sorted(ops)), "graphs": extra}


def runtime_needed(layout: dict[str, Any], graph_inputs: tuple[str, ...]) -> str:
    """bundle.json `requirements.edge_llm`: the oldest edge-llm that runs this bundle right
    ("": any) — the newest of what its parts need."""
    need = [""]
    if layout.get("kv_spare", 0) > 0:
        need.append(KV_SPARE_RUNTIME)  # older runtimes ignore kv_spare and overrun the KV buffer
    if PAD_INPUT in graph_inputs:
        need.append(PAD_SWITCH_RUNTIME)  # feeds the padded graph's switch
    draft = layout.get("draft")
    if draft is not None and draft.kind == "eagle1":
        need.append(EAGLE1_RUNTIME)  # keeps the draft's own KV cache
    return max(need, key=lambda v: version_tuple(v) if v else ())
