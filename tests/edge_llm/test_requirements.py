"""bundle.json `requirements`: derived from the graph's ops at export, checked before a session.

A bundle needing a newer onnxruntime than installed is refused with one line that says what to
do; a bundle written before the field existed still loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_llm import cli
from edge_llm.bundle import PORTABLE_CPU_ORT, load_bundle, requirements_problem, version_tuple
from edge_llm.engine import Engine
from edge_llm.errors import BundleError


def _copy_with(src: Path, dst: Path, change) -> Path:
    root = Path(shutil.copytree(src, dst))
    path = root / "bundle.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return root


def test_fused_bundle_states_what_it_needs(tiny_fused_int8: Path) -> None:
    req = load_bundle(tiny_fused_int8).requirements
    assert req is not None
    # The cpu target's graph is the portable one: its ops need no more than the stated floor.
    assert req.onnxruntime == PORTABLE_CPU_ORT
    assert req.target == "cpu"
    assert {"com.microsoft:GroupQueryAttention", "com.microsoft:MatMulNBits"} <= set(req.contrib_ops)


def test_bundle_needing_newer_ort_is_refused_in_one_line(
    tiny_fused_int8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_with(tiny_fused_int8, tmp_path / "b", lambda d: d["requirements"].update(onnxruntime="99.1"))
    want = f"this bundle needs onnxruntime ≥ 99.1; found {ort.__version__}: "
    want += "upgrade, or re-export with --target cpu"
    with pytest.raises(BundleError, match=want):
        Engine.load(root)
    assert cli.main(["generate", "--bundle", str(root), "--max-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and want in err and "INVALID_GRAPH" not in err


def test_older_bundle_without_requirements_loads(tiny_fused_int8: Path, tmp_path: Path) -> None:
    root = _copy_with(tiny_fused_int8, tmp_path / "b", lambda d: d.pop("requirements"))
    engine = Engine.load(root)
    assert engine.bundle.requirements is None
    assert requirements_problem(engine.bundle, "1.0.0") is None


def test_malformed_requirement_fails_the_load(tiny_fused_int8: Path, tmp_path: Path) -> None:
    root = _copy_with(tiny_fused_int8, tmp_path / "b", lambda d: d["requirements"].update(onnxruntime="new"))
    with pytest.raises(BundleError, match="malformed manifest"):
        load_bundle(root)


def test_older_than_every_target_says_upgrade_only(tiny_fused_int8: Path) -> None:
    problem = requirements_problem(load_bundle(tiny_fused_int8), "1.20.1")
    assert problem == f"this bundle needs onnxruntime ≥ {PORTABLE_CPU_ORT}; found 1.20.1: upgrade " + (
        f"(no target runs on onnxruntime < {PORTABLE_CPU_ORT})"
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1.23.2", (1, 23, 2)),
        ("1.24.1+openvino", (1, 24, 1)),
        ("1.33.0.dev20261201", (1, 33, 0)),
        ("2", (2,)),
    ],
)
def test_version_tuple(text: str, want: tuple[int, ...]) -> None:
    assert version_tuple(text) == want


def test_query_seqlens_graph_needs_ort_132(tmp_path: Path, tiny_hf: Path) -> None:
    """GQA's 17th input: 1.31.1 refuses the node, so the derived floor is the table's 1.32.0."""
    pytest.importorskip("torch")
    from export import fuse, targets

    res = fuse.run(fuse.FuseConfig(max_context=64, query_seqlens_input=True), tiny_hf, tmp_path)
    req = targets.requirements([res.model_path], "cpu", exporting_ort="1.32.0")
    assert req["onnxruntime"] == "1.32.0"
    plain = fuse.run(fuse.FuseConfig(max_context=64), tiny_hf, tmp_path / "plain")
    assert (
        targets.requirements([plain.model_path], "cpu", exporting_ort="1.32.0")["onnxruntime"]
        == PORTABLE_CPU_ORT
    )


def test_doctor_checks_bundle_profiles_and_smoke_runs(
    tiny_fused_int8: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", "--json", "--bundle", str(tiny_fused_int8)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["onnxruntime"] == ort.__version__
    assert info["bundle"]["requirements_met"] is True
    assert info["bundle"]["needs_onnxruntime"] == PORTABLE_CPU_ORT
    assert info["board_profiles"]["cpu-2core"] == "CPUExecutionProvider"
    assert info["smoke"]["CPUExecutionProvider"].startswith("ok on CPUExecutionProvider")

    newer = _copy_with(
        tiny_fused_int8, tmp_path / "b", lambda d: d["requirements"].update(onnxruntime="99.1")
    )
    assert cli.main(["doctor", "--json", "--bundle", str(newer)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bundle"]["requirements_met"] is False
    assert info["bundle"]["problem"].startswith("this bundle needs onnxruntime ≥ 99.1")
    assert info["smoke"]["CPUExecutionProvider"].startswith("failed: ")


def test_provider_flag_and_usage_name_the_provider(
    tiny_fused_int8: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "generate",
        "--bundle",
        str(tiny_fused_int8),
        "--max-tokens",
        "3",
        "--stats",
        "--provider",
        "cpu",
        "hi",
    ]
    assert cli.main(args) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["provider"] == "CPUExecutionProvider" and stats["cpu_fallback_nodes"] == 0
    assert cli.main([*args[:-3], "--provider", "nope", "hi"]) == 2
    assert "unknown execution provider 'nope'" in capsys.readouterr().err


def test_placement_counted_from_a_profile(tiny_fused_int8: Path, tmp_path: Path) -> None:
    """The fallback count comes from onnxruntime's own profile of a run: on CPU every node of the
    graph is a CPUExecutionProvider node."""
    from edge_llm.providers import placement_from_profile

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    graph = tiny_fused_int8 / "model.onnx"
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    engine = Engine.load(tiny_fused_int8)
    engine.runner.session = sess
    engine.runner.forward(np.array([[1, 2, 3]], np.int64), engine.runner.empty(1))
    counts = placement_from_profile(sess.end_profiling())
    import onnx

    nodes = len(onnx.load(str(graph), load_external_data=False).graph.node)
    assert set(counts) == {"CPUExecutionProvider"}
    assert 0 < counts["CPUExecutionProvider"] <= nodes
