"""Shared fixtures: a tiny random Llama (built in seconds) and bundles exported from it.

The whole session uses its own cache folder (EDGE_LLM_CACHE), so tests never touch the user's
cache and every stage runs for real on the tiny model. It replaces any EDGE_LLM_CACHE the user
has set (a `setdefault` here once let 38 test stage folders into a user's real cache) and is
removed when the session ends. EDGE_LLM_TEST_CACHE names a folder to use (and keep) instead,
e.g. to reuse the real model's download across `-m slow` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

_KEEP = os.environ.get("EDGE_LLM_TEST_CACHE")
_CACHE = Path(_KEEP) if _KEEP else Path(tempfile.mkdtemp(prefix="edge-llm-test-cache-"))
os.environ["EDGE_LLM_CACHE"] = str(_CACHE)


ROOT = Path(__file__).resolve().parents[1]


def venv_python(here: bool, env_var: str, venv: str) -> str | None:
    """An interpreter with an onnxruntime build this venv lacks (its wheel replaces the
    `onnxruntime` module, so it lives in a venv of its own): this one when `here`, else $env_var,
    else `.venvs/<venv>/bin/python` under the repo root (what .ci/run caches); None: none found."""
    if here:
        return sys.executable
    for python in (os.environ.get(env_var, ""), str(ROOT / ".venvs" / venv / "bin" / "python")):
        if python and Path(python).is_file():
            return python
    return None


def run_python(python: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`python *args` from the repo root with this checkout on PYTHONPATH, output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.run([python, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove this session's temporary cache (subprocesses the tests started are done by now)."""
    if not _KEEP:
        shutil.rmtree(_CACHE, ignore_errors=True)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAIN_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Small language models run on embedded boards with ONNX Runtime.",
    "Grüße aus München! 日本語のテキスト。 Emoji: 🙂🚀 café naïve",
    "def add(a, b):\n    return a + b\n",
] * 20


def build_tiny_hf(out: Path, *, layers: int = 2, vocab: int = 384, seed: int = 0) -> Path:
    """A random LlamaForCausalLM + a byte-level BPE tokenizer with a chat template, saved as HF."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaky logits: greedy ties between runtimes become unlikely
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("tiny-hf"))


def export_bundle(
    hf_dir: Path,
    out: Path,
    quant: str = "none",
    graph: str = "optimum",
    logits: str = "tail",
    fuse: Any = None,
    draft: object | None = None,
) -> Path:
    from export import recipe as recipe_mod
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig
    from export.to_onnx import ToOnnxConfig

    recipe = recipe_mod.Recipe(
        name=f"tiny-{quant}" if graph == "optimum" else f"tiny-{graph}-{quant}",
        load=LoadConfig(model=str(hf_dir)),
        to_onnx=ToOnnxConfig(graph=graph, max_context=256, logits=logits),
        quantize=QuantizeConfig(mode=quant, block_size=16),  # rows are only 64 wide here
        fuse=fuse,
        draft=draft,  # type: ignore[arg-type]
    )
    return recipe_mod.run(recipe, out)


def static_qdq_bundle(hf_dir: Path, text: Path, out: Path, name: str, target: object | None = None) -> Path:
    """The tiny model's [static] QDQ16 bundle (past 96, prefill 16): the graphs target qnn-htp
    compiles (`target`: an export.targets.TargetConfig, or None for the plain QDQ graphs)."""
    from export import recipe as recipe_mod
    from export.fix_shapes import FixShapesConfig
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig

    quant = QuantizeConfig(
        mode="qdq", activation_bits=16, calib_tokens=256, calib_seq_len=32, calib_text=text, calib_span=(0, 1)
    )
    recipe = recipe_mod.Recipe(
        name=name,
        load=LoadConfig(model=str(hf_dir)),
        quantize=quant,
        static=FixShapesConfig(past_length=96, prefill_length=16),
        **({"target": target} if target is not None else {}),  # type: ignore[arg-type]
    )
    return recipe_mod.run(recipe, out)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 bundle of the tiny model (bit-for-bit comparable with transformers)."""
    return export_bundle(tiny_hf, tmp_path_factory.mktemp("bundles") / "tiny-fp32", "none")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_hf, tmp_path_factory.mktemp("bundles") / "tiny-int8", "int8")


@pytest.fixture(scope="session")
def tiny_fused(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 fused-graph bundle (GroupQueryAttention, shared KV buffer, "tail" logits)."""
    return export_bundle(tiny_hf, tmp_path_factory.mktemp("bundles") / "tiny-fused", "none", "fused")


@pytest.fixture(scope="session")
def tiny_fused_int8(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_hf, tmp_path_factory.mktemp("bundles") / "tiny-fused-int8", "int8", "fused")


def fuse_every_variant(tmp_path_factory: pytest.TempPathFactory, pad_query_row: bool = False) -> Any:
    """[fuse] with every variant (fp32 and int8 KV, each also with query_seqlens), the int8 KV
    scales calibrated on the tiny training text."""
    from export.variants import FuseOptions

    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text("\n".join(TRAIN_TEXT), encoding="utf-8")
    return FuseOptions(
        "both",
        calib_text=text,
        calib_span=(0.0, 1.0),
        calib_tokens=512,
        calib_window=128,
        pad_query_row=pad_query_row,
    )


@pytest.fixture(scope="session")
def tiny_fused_variants(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused bundle with every [fuse] variant: fp32 and int8 KV, each also with query_seqlens."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-variants"
    return export_bundle(tiny_hf, out, "none", "fused", fuse=fuse_every_variant(tmp_path_factory))


@pytest.fixture(scope="session")
def tiny_fused_padded(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_fused_variants' graphs at int8 with [fuse] pad_query_row: every GroupQueryAttention
    node gets a dummy query row behind the `query_pad` input (the runtime sets it for lone rows:
    their plain decode = verify forwards bit for bit)."""
    fuse = fuse_every_variant(tmp_path_factory, pad_query_row=True)
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-padded"
    return export_bundle(tiny_hf, out, "int8", "fused", fuse=fuse)


@pytest.fixture(scope="session")
def tiny_fused_unpadded(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_fused_padded exported without [fuse] pad_query_row: the same weights and KV scales."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-unpadded"
    return export_bundle(tiny_hf, out, "int8", "fused", fuse=fuse_every_variant(tmp_path_factory))


@pytest.fixture(scope="session")
def tiny_fused_all(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused bundle returning logits for every position (perplexity, speculative verify)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-all"
    return export_bundle(tiny_hf, out, "none", "fused", logits="all")


@pytest.fixture(scope="session")
def tiny_fused_last(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused bundle that only ever returns each row's last-position logits."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-fused-last"
    return export_bundle(tiny_hf, out, "none", "fused", logits="last")


def tiny_draft_config(text: Path) -> object:
    """A draft for the tiny model: trained in seconds (it agrees little; tests check correctness)."""
    from export.train_draft import DraftConfig

    return DraftConfig(
        text=text,
        span=(0.3, 1.0),
        eval_span=(0.0, 0.3),
        tokens=1024,
        eval_tokens=256,
        chat_tokens=300,
        chat_max_answer=24,
        seq_len=32,
        vocab=128,
        intermediate=32,
        batch=64,
        epochs=2.0,
        block_size=16,
        threads=1,
    )


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(TRAIN_TEXT), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_draft(tiny_hf: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fused fp32 bundle with a trained speculative draft (and the hidden-state output)."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-draft"
    return export_bundle(tiny_hf, out, "none", "fused", draft=tiny_draft_config(tiny_text))


@pytest.fixture(scope="session")
def tiny_eagle(tiny_hf: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_draft with the EAGLE-1-style draft (kind "eagle1": an attention layer, its own KV)."""
    from dataclasses import replace

    out = tmp_path_factory.mktemp("bundles") / "tiny-eagle"
    config = replace(tiny_draft_config(tiny_text), kind="eagle1", window=16)  # type: ignore[type-var]
    return export_bundle(tiny_hf, out, "none", "fused", draft=config)


def gate_method(
    obj: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Hold calls of `obj.name` until the returned gate is set (30 s at most); the second event
    says a call began. For an engine mid-answer (a reload waiting, a wedged serving loop)."""
    gate, entered = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, gated)
    return gate, entered
