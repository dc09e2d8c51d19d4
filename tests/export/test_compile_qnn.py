"""Target qnn-htp's compile step: which interpreter compiles, and what `[target]` accepts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from edge_llm.errors import ExportError
from export import compile_qnn
from export.targets import TargetConfig


def test_soc_model_is_for_the_qnn_target_only() -> None:
    assert TargetConfig("qnn-htp", soc_model=43).soc_model == 43
    with pytest.raises(ValueError, match="soc_model is for target qnn-htp"):
        TargetConfig("cpu", soc_model=57)
    with pytest.raises(ValueError, match="QNN SoC id"):
        TargetConfig("qnn-htp", soc_model=-1)


def test_compile_needs_an_interpreter_with_onnxruntime_qnn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        compile_qnn.importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime_qnn" else real(n, *a)
    )
    monkeypatch.delenv(compile_qnn.PYTHON_ENV, raising=False)
    with pytest.raises(ExportError, match="EDGE_LLM_QNN_PYTHON=/path/to/that/venv/bin/python"):
        compile_qnn.qnn_python()
    monkeypatch.setenv(compile_qnn.PYTHON_ENV, str(tmp_path / "nope"))
    with pytest.raises(ExportError, match="no such interpreter"):
        compile_qnn.qnn_python()
    monkeypatch.setenv(compile_qnn.PYTHON_ENV, sys.executable)
    assert compile_qnn.qnn_python() == sys.executable
