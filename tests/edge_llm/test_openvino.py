"""The openvino target (issue 13): its bundle's provider options reach OpenVINO's session.

The openvino bundle records `provider_options` {"openvino": {"precision": "ACCURACY"}}: OpenVINO's
CPU default (FP32) quantizes the activations of int8-weight MatMuls on the fly, which changed
SmolLM2's answer (export/targets.py). Without onnxruntime-openvino (the suite's own venv) the
manifest and the fallback to CPU are checked here; with it, found as this interpreter (when its
onnxruntime offers OpenVINOExecutionProvider), $EDGE_LLM_OPENVINO_PYTHON or
`.venvs/openvino/bin/python` under the repo root (the wheel replaces the `onnxruntime` module,
so it lives in a venv of its own), the tiny model runs on the real EP: the bundle's option and
--provider-option change the logits the session computes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from edge_llm.board import RunnerOptions
from edge_llm.engine import Engine
from edge_llm.providers import ProviderSpec
from tests.conftest import run_python, venv_python

ROOT = Path(__file__).resolve().parents[2]


HAS_EP = "OpenVINOExecutionProvider" in ort.get_available_providers()


OV_PYTHON = venv_python(HAS_EP, "EDGE_LLM_OPENVINO_PYTHON", "openvino")
needs_openvino = pytest.mark.skipif(
    OV_PYTHON is None, reason="no onnxruntime-openvino (set EDGE_LLM_OPENVINO_PYTHON)"
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    assert OV_PYTHON is not None
    return run_python(OV_PYTHON, *args)


@pytest.fixture(scope="module")
def tiny_openvino(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported for target openvino, int8 in blocks of 32: OpenVINO's on-the-fly
    activation quantization (groups of 32) applies to it, as to SmolLM2's blocks of 64."""
    pytest.importorskip("torch")
    from export import recipe as recipe_mod
    from export.load import LoadConfig
    from export.quantize import QuantizeConfig
    from export.targets import TargetConfig
    from export.to_onnx import ToOnnxConfig

    recipe = recipe_mod.Recipe(
        name="tiny-openvino",
        load=LoadConfig(model=str(tiny_hf)),
        to_onnx=ToOnnxConfig(graph="optimum", max_context=256),
        quantize=QuantizeConfig(mode="int8", block_size=32),
        target=TargetConfig("openvino"),
    )
    return recipe_mod.run(recipe, tmp_path_factory.mktemp("openvino") / "bundle")


def test_the_openvino_bundle_asks_for_accuracy(tiny_openvino: Path) -> None:
    manifest = json.loads((tiny_openvino / "bundle.json").read_text())
    assert manifest["provider_options"] == {"openvino": {"precision": "ACCURACY"}}
    assert manifest["requirements"]["target"] == "openvino"


@pytest.mark.skipif(HAS_EP, reason="this interpreter has the OpenVINO EP")
def test_without_openvino_the_bundle_runs_on_cpu(tiny_openvino: Path) -> None:
    engine = Engine.load(tiny_openvino, RunnerOptions(threads=1, providers=(ProviderSpec("openvino"),)))
    assert engine.runner.provider == "CPUExecutionProvider"
    assert engine.runner.plan.provider_options == [{}]  # the bundle's openvino options stay unused


@needs_openvino
def test_bundle_and_flag_options_reach_the_openvino_session(tiny_openvino: Path, tmp_path: Path) -> None:
    """On the real EP: the bundle's ACCURACY gives the logits of an explicit ACCURACY and not
    those of FP32 (on-the-fly int8 activations), which `--provider-option` restores."""
    out = tmp_path / "ov"
    res = _run(
        str(ROOT / "benchmarks" / "openvino_precision.py"),
        "--bundle", str(tiny_openvino),
        "--rows", "cpu,bundle,FP32,ACCURACY,FP32-dq0",
        "--positions", "32", "--answer-tokens", "4", "--threads", "1", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["cpu"]["provider"] == "CPUExecutionProvider"
    for name in ("bundle", "FP32", "ACCURACY", "FP32-dq0"):
        assert rows[name]["provider"] == "OpenVINOExecutionProvider"
        assert rows[name]["cpu_fallback_nodes"] == 0
    assert rows["bundle"]["options"] == {"precision": "ACCURACY"}
    assert rows["bundle"]["bit_identical_to_ACCURACY"]  # max_diff_vs_* is rounded to 5 decimals
    assert rows["FP32-dq0"]["bit_identical_to_ACCURACY"]  # ACCURACY = dynamic quantization off
    assert rows["FP32"]["max_diff_vs_ACCURACY"] > 1e-3

    gen = ["-m", "edge_llm.cli", "-v", "generate", "--bundle", str(tiny_openvino), "--provider", "openvino"]
    gen += ["--stats", "--raw", "--ignore-eos", "--max-tokens", "4", "--threads", "1"]
    # Through the CLI: the plan the session is created with (-v logs it) carries the bundle's
    # ACCURACY, and the flag's FP32 over it. (ORT 1.24's get_provider_options() reports no
    # OpenVINO options, and 4 greedy tokens of the tiny model are the same under both.)
    for flag, precision in (([], "ACCURACY"), (["--provider-option", "openvino.precision=FP32"], "FP32")):
        res = _run(*gen, *flag, "The capital of France")
        assert res.returncode == 0, res.stderr[-3000:]
        stats = json.loads(res.stderr.strip().splitlines()[-1])
        assert stats["provider"] == "OpenVINOExecutionProvider" and stats["completion_tokens"] == 4
        assert f"use openvino: OpenVINOExecutionProvider {{'precision': '{precision}'}}" in res.stderr


@needs_openvino
def test_doctor_lists_the_openvino_provider(tiny_openvino: Path) -> None:
    res = _run("-m", "edge_llm.cli", "doctor", "--bundle", str(tiny_openvino), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    doctor = json.loads(res.stdout)
    assert "OpenVINOExecutionProvider" in doctor["providers"]
    assert doctor["smoke"]["OpenVINOExecutionProvider"].startswith("ok on OpenVINOExecutionProvider")
    assert doctor["bundle"]["provider_options"] == ['openvino: {"precision": "ACCURACY"}']


@needs_openvino
def test_a_provider_that_takes_no_node_is_named(tiny_openvino: Path) -> None:
    """OpenVINO asked for its NPU on a machine without one: onnxruntime runs every node on CPU
    without a word; the runner says so once it has counted the placement."""
    res = _run(
        "-m", "edge_llm.cli", "generate", "--bundle", str(tiny_openvino), "--provider", "openvino",
        "--provider-option", "openvino.device=NPU", "--stats", "--raw", "--max-tokens", "2",
        "--threads", "1", "The capital of France",
    )  # fmt: skip
    if res.returncode != 0 and "NPU" in res.stderr:
        pytest.skip(f"this onnxruntime-openvino refuses a missing NPU outright: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads(res.stderr.strip().splitlines()[-1])
    if stats["cpu_fallback_nodes"] == 0:
        pytest.skip("this machine has an NPU that OpenVINO uses")
    assert "OpenVINOExecutionProvider took none of the graph's" in res.stderr
