"""Faster distillation: cached top-k teacher targets (their loss against the full KL, the teacher
running once per row across runs), bf16 autocast of the student, snapshots for a learning curve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from export import distill, distill_targets
from tests.export.test_distill import _config, _kl


def _full_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    t_lp = torch.log_softmax(t / temperature, -1)
    return (t_lp.exp() * (t_lp - torch.log_softmax(s / temperature, -1))).sum(-1).mean()


def _topk_loss(s: torch.Tensor, t: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    return distill_targets.topk_kl(s, *distill_targets.teacher_topk(t, k, temperature), temperature)


def _grad(loss_of: object, s: torch.Tensor) -> torch.Tensor:
    x = s.clone().requires_grad_(True)
    loss_of(x).backward()  # type: ignore[operator]
    assert x.grad is not None
    return x.grad.flatten()


def test_topk_kl_is_the_full_kl_with_every_token_and_a_lower_bound_with_fewer() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    full = _full_kl(s, t, 2.0)
    torch.testing.assert_close(_topk_loss(s, t, 49, 2.0), full, atol=1e-4, rtol=1e-4)  # tail: 1 token
    for k in (1, 8, 32):
        assert 0 <= _topk_loss(s, t, k, 2.0) <= full + 1e-6
    same = _topk_loss(t, t, 8, 2.0)
    assert abs(float(same)) < 1e-5  # the student equal to the teacher: nothing to learn


def test_topk_gradient_follows_the_full_kl_on_a_tiny_model(pair: tuple[Path, Path]) -> None:
    """The logits' gradient (what reaches every weight) from top-k + tail against the full KL's,
    for the tiny teacher and its pruned student on the same rows: closer the less mass the tail
    holds. The tiny random teacher is flat at T = 2 (384 tokens; top-64 leaves 57% in the tail,
    top-256 11%); benchmarks/distill_speed.py measures SmolLM2's (cosine 0.99+ at k = 64)."""
    teacher, student = pair
    ids = torch.randint(3, 384, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = AutoModelForCausalLM.from_pretrained(str(teacher))(ids).logits
        s = AutoModelForCausalLM.from_pretrained(str(student))(ids).logits
    full = _grad(lambda x: _full_kl(x, t, 2.0), s)
    cos, tail = {}, {}
    for k in (8, 64, 256):
        cos[k] = float(
            torch.cosine_similarity(_grad(lambda x, k=k: _topk_loss(x, t, k, 2.0), s), full, dim=0)
        )
        tail[k] = float(distill_targets.teacher_topk(t, k, 2.0)[2].exp().mean())
    assert cos[8] < cos[64] < cos[256] and tail[8] > tail[64] > tail[256], (cos, tail)
    assert tail[256] < 0.15 and cos[256] > 0.98, (cos, tail)
    assert cos[8] > 0.5, cos  # even 8 tokens and a tail of ~90% point the same way


def test_cached_targets_distill_and_a_rerun_never_runs_the_teacher(
    pair: tuple[Path, Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_LLM_CACHE", str(tmp_path / "cache"))
    teacher, student = pair
    before = _kl(student, teacher, text_file)
    cfg = _config(text_file, teacher_topk=256)  # the flat tiny teacher: 11% in the tail
    first = distill.run(cfg, teacher, student, tmp_path / "a", progress=False)
    rows = distill.training_ids(cfg, distill.load_tokenizer(student), None, "cpu")[0].shape[0]
    assert first["teacher_rows"] == rows  # each row met the teacher once, over 24 steps of 4 rows
    assert rows < 24 * 4
    assert _kl(tmp_path / "a", teacher, text_file) < 0.85 * before
    assert list((tmp_path / "cache" / distill_targets.FOLDER).glob("*.npz"))

    def no_teacher(*_a: object, **_k: object) -> None:
        raise AssertionError("the teacher ran although every row's targets were cached")

    monkeypatch.setattr(distill, "_teacher", no_teacher)
    second = distill.run(cfg, teacher, student, tmp_path / "b", progress=False)
    assert second["teacher_rows"] == 0 and second["last_loss"] == first["last_loss"]


def test_bf16_student_forward_and_training(pair: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    teacher, student = pair
    model = AutoModelForCausalLM.from_pretrained(str(student))
    ids = torch.randint(3, 384, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        fp32 = distill.student_forward(model, ids, bf16=False).logits
        bf16 = distill.student_forward(model, ids, bf16=True).logits
    torch.testing.assert_close(fp32, ref)  # the same model, split at the LM head
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)
    assert (bf16 - ref).abs().max() < 0.1 * ref.abs().max()
    before = _kl(student, teacher, text_file)
    rep = distill.run(_config(text_file, autocast="bf16"), teacher, student, tmp_path / "d", progress=False)
    assert rep["bf16"] is True
    assert _kl(tmp_path / "d", teacher, text_file) < 0.85 * before


def test_snapshots_at_token_counts(pair: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    teacher, student = pair
    cfg = _config(text_file, tokens=32 * 4 * 6, save_at=(200, 32 * 4 * 3))
    distill.run(cfg, teacher, student, tmp_path / "d", progress=False)
    for at in cfg.save_at:
        assert (tmp_path / "d" / f"at-{at}" / "model.safetensors").is_file()
        assert (tmp_path / "d" / f"at-{at}" / "tokenizer.json").is_file()
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d" / "at-384")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d")).state_dict()
    assert any(not torch.equal(a[n], b[n]) for n in a)  # a snapshot, not the final model


def test_bad_fast_distill_config_rejected() -> None:
    with pytest.raises(ValueError, match="hidden_weight needs"):
        distill.DistillConfig(teacher_topk=16, hidden_weight=0.5)
    with pytest.raises(ValueError, match="teacher_topk"):
        distill.DistillConfig(teacher_topk=-1)
    with pytest.raises(ValueError, match="save_at"):
        distill.DistillConfig(save_at=(0,))
