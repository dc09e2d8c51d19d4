"""Vocabulary trimming on a tiny random Llama: the tokenizer stays consistent (round trip for all
text, the same tokens for text whose tokens are kept), the model's logits are the teacher's rows,
and the runtime generates from the trimmed bundle as from the HF model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from edge_llm.errors import ExportError
from export import distill, evaluate, trim_vocab
from tests.conftest import TRAIN_TEXT, build_tiny_hf

SIZE = 320  # of 384: 3 specials + 256 byte characters + 61 merged tokens kept
OTHER = ["Paris is the capital. Rome, München and naïve café 🙂", "return a + b  # the sum\n\tdone"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf(tmp_path_factory.mktemp("teacher"), layers=2)


@pytest.fixture(scope="module")
def trimmed(teacher: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trimmed")
    cfg = trim_vocab.TrimVocabConfig(size=SIZE, prior=0, text=text_file, span=(0.0, 1.0), multiple=1)
    trim_vocab.run(cfg, teacher, out)
    return out


def _tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_tokenizer_round_trip_and_kept_text_tokenizes_as_before(teacher: Path, trimmed: Path) -> None:
    old, new = _tok(teacher), _tok(trimmed)
    ids = trim_vocab.teacher_ids(trimmed)
    assert ids is not None and len(ids) == SIZE == new.get_vocab_size(with_added_tokens=True)
    assert list(ids[:3]) == [0, 1, 2]  # specials keep their ids
    removed_some = False
    for text in [*TRAIN_TEXT[:4], *OTHER]:
        a, b = old.encode(text, add_special_tokens=False).ids, new.encode(text, add_special_tokens=False).ids
        assert new.decode(b) == text  # every text stays encodable, nothing lost
        if set(a) <= set(ids.tolist()):
            assert ids[b].tolist() == a  # all its tokens kept: the same tokens, renumbered
        else:
            removed_some = True
            assert len(b) > len(a)  # split into the smaller kept pieces
    assert removed_some  # the case above is exercised too
    chat = "<|im_start|>user\nParis?<|im_end|>\n"
    assert new.encode(chat, add_special_tokens=False).ids[0] == 1
    cfg = json.loads((trimmed / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (SIZE, 1, 2)
    merges = json.loads((trimmed / "tokenizer.json").read_text())["model"]["merges"]
    vocab = new.get_vocab()
    assert all("".join(m if isinstance(m, list) else m.split(" ")) in vocab for m in merges)


def test_trimmed_logits_are_the_teachers_kept_rows(teacher: Path, trimmed: Path) -> None:
    ids = trim_vocab.teacher_ids(trimmed)
    assert ids is not None
    x = torch.randint(0, SIZE, (2, 20), generator=torch.Generator().manual_seed(0))
    small = AutoModelForCausalLM.from_pretrained(str(trimmed)).eval()
    big = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    with torch.inference_mode():
        got = small(x).logits
        want = big(torch.from_numpy(ids)[x]).logits[..., torch.from_numpy(ids)]
    assert got.shape[-1] == SIZE
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_runtime_generates_from_the_trimmed_bundle(trimmed: Path, teacher: Path, tmp_path: Path) -> None:
    from edge_llm.engine import Engine
    from edge_llm.sampling import SamplingParams
    from export import recipe as recipe_mod
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig
    from export.to_onnx import ToOnnxConfig

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(TRAIN_TEXT), encoding="utf-8")
    recipe = recipe_mod.Recipe(
        name="tiny-trimmed",
        load=LoadConfig(model=str(teacher)),
        trim_vocab=trim_vocab.TrimVocabConfig(size=SIZE, prior=0, text=text, span=(0.0, 1.0), multiple=1),
        to_onnx=ToOnnxConfig(graph="fused", max_context=256),
        quantize=QuantizeConfig(mode="none"),
    )
    bundle = recipe_mod.run(recipe, tmp_path / "b")
    assert (bundle / trim_vocab.MAP).is_file()  # travels for evaluation; the runtime ignores it
    engine = Engine.load(bundle)
    assert engine.bundle.architecture.vocab_size == SIZE
    prompt = _tok(trimmed).encode("The capital of France is", add_special_tokens=False).ids
    out = engine.complete(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(str(trimmed)).eval()
    with torch.inference_mode():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert list(out.token_ids) == want[0, len(prompt) :].tolist()
    # Against the teacher restricted to the kept tokens, an fp32 bundle of the trimmed model is the
    # same distribution; bits per byte (not per-token perplexity) compares the two tokenizers.
    cfg = evaluate.EvaluateConfig(
        text=tmp_path / "t.txt", span=(0.0, 1.0), max_tokens=200, context=64, stride=64, speed=False,
        chat_tokens=48, chat_max_answer=12,
    )  # fmt: skip
    cfg.text.write_text("\n".join(TRAIN_TEXT[:8] + OTHER), encoding="utf-8")
    res = evaluate.run(cfg, bundle, teacher, progress=False)
    assert res["top1_agreement"] == 1.0 and res["kl_to_teacher"] < 1e-4
    assert res["vocab_trimmed"] == {"vocab": SIZE, "teacher_vocab": 384}
    assert res["scored_tokens"] > res["teacher_scored_tokens"]  # the smaller vocabulary splits more
    assert res["bits_per_byte"] > 0 and res["teacher_bits_per_byte"] > 0
    # the teacher's chats, re-encoded by the trimmed tokenizer, score the same way
    assert res["chat_top1_agreement"] == 1.0 and res["chat_kl_to_teacher"] < 1e-4


def test_distillation_into_a_trimmed_student(
    teacher: Path, trimmed: Path, text_file: Path, tmp_path: Path
) -> None:
    cfg = distill.DistillConfig(
        text=text_file, span=(0.0, 1.0), tokens=32 * 4 * 6, seq_len=32, batch=4, grad_accum=1,
        lr=3e-3, warmup_steps=1, threads=1, freeze_embeddings=False,
    )  # fmt: skip
    # A student that starts away from the teacher: the trimmed model with its layers perturbed.
    student = tmp_path / "student"
    model = AutoModelForCausalLM.from_pretrained(str(trimmed))
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(student)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", trim_vocab.MAP):
        (student / f).write_bytes((trimmed / f).read_bytes())
    report = distill.run(cfg, teacher, student, tmp_path / "out", progress=False)
    assert report["last_loss"]["kl"] < report["first_loss"]["kl"]
    assert (tmp_path / "out" / trim_vocab.MAP).is_file()
    ids = np.asarray(_tok(trimmed).encode("\n".join(TRAIN_TEXT[:8]), add_special_tokens=False).ids)
    vmap = trim_vocab.teacher_ids(trimmed)
    t = evaluate.restricted(evaluate.torch_logits(teacher)[0], vmap)
    before = evaluate.score(ids, evaluate.torch_logits(student)[0], 64, 64, t)["kl_to_teacher"]
    after = evaluate.score(ids, evaluate.torch_logits(tmp_path / "out")[0], 64, 64, t)["kl_to_teacher"]
    assert after < 0.8 * before  # closer to the restricted teacher on the student's own tokens


def test_bad_input_is_rejected(
    teacher: Path, trimmed: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="size"):
        trim_vocab.TrimVocabConfig(size=1, text=text_file)
    small = trim_vocab.TrimVocabConfig(size=100, prior=0, text=text_file, span=(0.0, 1.0), multiple=1)
    with pytest.raises(ExportError, match="special and byte tokens"):
        trim_vocab.run(small, teacher, tmp_path / "a")
    again = trim_vocab.TrimVocabConfig(size=300, text=text_file, span=(0.0, 1.0), multiple=1)
    with pytest.raises(ExportError, match="trimmed already"):
        trim_vocab.run(again, trimmed, tmp_path / "b")
    bigger = trim_vocab.TrimVocabConfig(size=4096, text=text_file, span=(0.0, 1.0))
    with pytest.raises(ExportError, match="not below"):
        trim_vocab.run(bigger, teacher, tmp_path / "c")
    # teacher-sampled text cannot feed a trimmed student: refused before any model is loaded
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = distill.DistillConfig(text=text_file, span=(0.0, 1.0), tokens=128, seq_len=32, teacher_tokens=64)
    with pytest.raises(ExportError, match="teacher_tokens: not supported for a trimmed vocabulary"):
        distill.run(cfg, teacher, trimmed, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()
