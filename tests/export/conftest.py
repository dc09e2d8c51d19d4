"""Fixtures of the distillation tests (test_distill, test_distill_targets): a tiny teacher, its
pruned student and their training text."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import prune
from tests.conftest import build_tiny_hf


@pytest.fixture(scope="module")
def text_file(tiny_text: Path) -> Path:
    return tiny_text  # the session's training text file (tests/conftest.py)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> tuple[Path, Path]:
    """(teacher, pruned student) folders."""
    teacher = build_tiny_hf(tmp_path_factory.mktemp("teacher"), layers=4)
    student = tmp_path_factory.mktemp("student")
    cfg = prune.PruneConfig(
        layer_ratio=0.25,
        mlp_ratio=0.5,
        multiple=8,
        text=text_file,
        span=(0.0, 1.0),
        calib_tokens=256,
        seq_len=64,
    )
    prune.run(cfg, teacher, student)
    return teacher, student
