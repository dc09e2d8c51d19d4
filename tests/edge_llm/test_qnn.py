"""Qualcomm QNN through the onnxruntime-qnn plugin EP (issue 13 item 5).

Without the plugin (the suite's own venv): a board profile or --provider asking for qnn falls back
to CPU with the reason logged, and a qnn-htp bundle runs its plain QDQ graphs there.

With it: the plugin replaces nothing, but it is 240 MB and pins its own onnxruntime, so it lives in
a venv of its own, found as this interpreter (when it has onnxruntime_qnn), $EDGE_LLM_QNN_PYTHON,
or `.venvs/qnn/bin/python` under the repo root (what CI could cache). The tiny static QDQ bundle is
exported for target qnn-htp (its graphs compiled into QNN context binaries by that interpreter),
then run there on the HTP simulator (the x86_64 wheel's libQnnHtp.so) and compared with the CPU EP.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest

from edge_llm.providers import ProviderSpec, plan_providers
from tests.conftest import run_python, venv_python

ROOT = Path(__file__).resolve().parents[2]
HAS_PLUGIN = importlib.util.find_spec("onnxruntime_qnn") is not None


QNN_PYTHON = venv_python(HAS_PLUGIN, "EDGE_LLM_QNN_PYTHON", "qnn")
needs_qnn = pytest.mark.skipif(QNN_PYTHON is None, reason="no onnxruntime-qnn (set EDGE_LLM_QNN_PYTHON)")


_run = run_python


@pytest.mark.skipif(HAS_PLUGIN, reason="this interpreter has the plugin")
def test_qnn_without_the_plugin_falls_back_to_cpu_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_llm.providers"):
        plan = plan_providers((ProviderSpec("qnn", {"backend": "htp"}), ProviderSpec("cpu")))
    assert plan.providers == ["CPUExecutionProvider"] and not plan.by_device
    assert "plugin package onnxruntime-qnn is not installed" in plan.decisions[0]
    assert any("skip qnn" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_given_provider_list_never_registers_plugins() -> None:
    """Selection tests pass the list a build would offer: names only, no plugin registration."""
    plan = plan_providers(
        (ProviderSpec("qnn", {"backend": "htp"}),), ["QNNExecutionProvider", "CPUExecutionProvider"]
    )
    assert plan.providers == ["QNNExecutionProvider", "CPUExecutionProvider"] and not plan.by_device
    assert plan.provider_options[0] == {"backend_path": "libQnnHtp.so"}


@pytest.fixture(scope="module")
def tiny_qnn(tiny_hf: Path, tiny_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a qnn-htp bundle: static QDQ graphs (past 96, prefill 16) + contexts."""
    if QNN_PYTHON is None:
        pytest.skip("no onnxruntime-qnn (set EDGE_LLM_QNN_PYTHON)")
    pytest.importorskip("torch")
    from export.targets import TargetConfig
    from tests.conftest import static_qdq_bundle

    folder = tmp_path_factory.mktemp("qnn")
    old = os.environ.get("EDGE_LLM_QNN_PYTHON")
    os.environ["EDGE_LLM_QNN_PYTHON"] = QNN_PYTHON
    try:
        return static_qdq_bundle(tiny_hf, tiny_text, folder / "bundle", "tiny-qnn", TargetConfig("qnn-htp"))
    finally:
        if old is None:
            del os.environ["EDGE_LLM_QNN_PYTHON"]
        else:
            os.environ["EDGE_LLM_QNN_PYTHON"] = old


@needs_qnn
def test_qnn_htp_bundle_carries_its_context_binaries(tiny_qnn: Path) -> None:
    import onnx

    manifest = json.loads((tiny_qnn / "bundle.json").read_text())
    graph = manifest["graph"]
    assert graph["contexts"] == {"model.onnx": "model_ctx.onnx", "prefill.onnx": "prefill_ctx.onnx"}
    assert graph["context_provider"] == "QNNExecutionProvider"
    assert manifest["requirements"]["target"] == "qnn-htp"
    assert "com.microsoft:EPContext" not in manifest["requirements"]["contrib_ops"]
    for ctx in graph["contexts"].values():
        assert ctx in manifest["files"]
        nodes = onnx.load(str(tiny_qnn / ctx)).graph.node
        epc = [n for n in nodes if n.op_type == "EPContext"]
        assert len(epc) == 1
        attrs = {a.name: a for a in epc[0].attribute}
        assert attrs["embed_mode"].i == 1 and len(attrs["ep_cache_context"].s) > 10_000  # the binary
    (stage,) = [s for s in manifest["recipe"]["stages"] if s["stage"] == "compile_qnn"]
    assert stage["soc_model"] == 57 and stage["compile_s"] > 0 and stage["onnxruntime_qnn"]


@needs_qnn
def test_without_the_plugin_the_plain_graphs_run_on_cpu(tiny_qnn: Path) -> None:
    if HAS_PLUGIN:
        pytest.skip("this interpreter has the plugin")
    from edge_llm.board import RunnerOptions
    from edge_llm.engine import Engine
    from edge_llm.sampling import SamplingParams

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    asked = Engine.load(
        tiny_qnn, RunnerOptions(threads=1, providers=(ProviderSpec("qnn"), ProviderSpec("cpu")))
    )
    cpu = Engine.load(tiny_qnn, RunnerOptions(threads=1))
    assert asked.runner.provider == "CPUExecutionProvider"
    assert asked.runner.session_file.name == "model.onnx"  # not the context binary
    assert asked.complete([5, 17, 42], params).token_ids == cpu.complete([5, 17, 42], params).token_ids


@needs_qnn
def test_simulator_logits_agree_with_the_cpu_ep(tiny_qnn: Path, tmp_path: Path) -> None:
    assert QNN_PYTHON is not None
    out = tmp_path / "qnn.json"
    script = str(ROOT / "benchmarks" / "qnn_bundle.py")
    res = _run(
        QNN_PYTHON,
        script,
        "--bundle",
        str(tiny_qnn),
        "--positions",
        "80",
        "--decode",
        "8",
        "--json",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["qnn"]["provider"] == "QNNExecutionProvider" and result["qnn"]["graph"] == "model_ctx.onnx"
    assert result["cpu"]["provider"] == "CPUExecutionProvider" and result["cpu"]["graph"] == "model.onnx"
    assert result["positions"] == 80 and result["qnn"]["forwards"] == 5  # 80 tokens in 16-token chunks
    # The HTP computes in integer / fp16 what the CPU EP emulates in fp32 from the same QDQ graph;
    # measured on these random ids: max |diff| 0.73 (logits in -5.8..6.1), top-1 agreement 0.875;
    # with the fp16-safe RMSNorm (export/fp16_norm.py; the tiny model's values never overflowed)
    # 0.74 and 0.89.
    assert result["max_abs_diff"] < 1.5
    assert result["top1_agreement"] >= 0.75
    assert len(result["qnn"]["tokens"]) == 8


@needs_qnn
@pytest.mark.parametrize(
    "how", [["--provider", "qnn"], ["--config", str(ROOT / "configs" / "boards" / "qualcomm-npu.toml")]]
)
def test_generate_on_the_simulator(tiny_qnn: Path, how: list[str]) -> None:
    assert QNN_PYTHON is not None
    args = ["-m", "edge_llm.cli", "generate", "--bundle", str(tiny_qnn), *how, "--stats"]
    res = _run(QNN_PYTHON, *args, "--max-tokens", "8", "--raw", "--ignore-eos", "The capital of France")
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads([line for line in res.stderr.splitlines() if line.startswith("{")][-1])
    assert stats["provider"] == "QNNExecutionProvider" and stats["completion_tokens"] == 8
    # stdout is the answer only: the simulator's native "# LIBNATIVE: ..." note goes to stderr.
    assert res.stdout.strip() and "LIBNATIVE" not in res.stdout


@needs_qnn
def test_doctor_lists_and_smoke_runs_the_plugin(tiny_qnn: Path) -> None:
    assert QNN_PYTHON is not None
    res = _run(QNN_PYTHON, "-m", "edge_llm.cli", "doctor", "--bundle", str(tiny_qnn), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)  # nothing native on stdout
    assert report["plugin_providers"] == ["QNNExecutionProvider"]
    assert report["smoke"]["QNNExecutionProvider"].startswith("ok on QNNExecutionProvider")
    assert report["board_profiles"]["qualcomm-npu"] == "QNNExecutionProvider"


@needs_qnn
def test_rms_norm_on_the_simulator_only_after_the_fp16_rewrite() -> None:
    """One RMSNorm on the HTP (fp16) with SmolLM2's residual magnitudes: optimum's form is wrong
    (x² overflows), the export/fp16_norm.py form matches the exact norm."""
    assert QNN_PYTHON is not None
    res = _run(QNN_PYTHON, str(ROOT / "benchmarks" / "qnn_check.py"), "--norm")
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout[res.stdout.index("{") :])  # after the simulator's native note
    assert result["original"]["provider"] == result["fp16_norm"]["provider"] == "QNNExecutionProvider"
    # measured: original rows 67.7 / 0.088 / 11.2 / 5e-4; rewritten ≤ 8.2e-4 on every row
    assert result["original"]["median_rel_err_per_row"][0] > 1.0
    assert max(result["fp16_norm"]["median_rel_err_per_row"]) < 5e-3
