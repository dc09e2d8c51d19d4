"""Provider selection: configured, validated and tested for fallback, even where not runnable."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_llm.board import BoardConfig, load_board
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError
from edge_llm.providers import ProviderSpec, ort_options, plan_providers
from edge_llm.runner import RunnerOptions

REPO = Path(__file__).resolve().parents[2]


def test_unavailable_providers_fall_back_to_cpu() -> None:
    specs = (ProviderSpec("qnn", {"backend": "htp"}), ProviderSpec("cuda", {"device_id": 1}))
    plan = plan_providers(specs, available=["CPUExecutionProvider"])
    assert plan.providers == ["CPUExecutionProvider"]
    assert plan.decisions[0].startswith("skip qnn") and plan.decisions[1].startswith("skip cuda")
    assert "fallback" in plan.decisions[-1]


def test_first_available_provider_wins_with_its_options() -> None:
    specs = (
        ProviderSpec("tensorrt", {"fp16": True}),
        ProviderSpec("cuda", {"device_id": 1}),
        ProviderSpec("cpu"),
    )
    plan = plan_providers(specs, available=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert plan.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert plan.provider_options[0] == {"device_id": "1"}
    assert plan.chosen == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            ProviderSpec("qnn", {"backend": "htp", "performance_mode": "burst"}),
            {"backend_path": "libQnnHtp.so", "htp_performance_mode": "burst"},
        ),
        (
            ProviderSpec("openvino", {"device": "NPU", "threads": 4}),
            {"device_type": "NPU", "num_of_threads": "4"},
        ),
        (
            ProviderSpec("coreml", {"compute_units": "CPUAndNeuralEngine"}),
            {"MLComputeUnits": "CPUAndNeuralEngine"},
        ),
        (
            ProviderSpec("tensorrt", {"fp16": True, "engine_cache": False}),
            {"trt_fp16_enable": "1", "trt_engine_cache_enable": "0"},
        ),
    ],
)
def test_friendly_options_map_to_ort_keys(spec: ProviderSpec, expected: dict) -> None:
    assert ort_options(spec)[1] == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ProviderSpec("tpu"), "unknown execution provider 'tpu'"),
        (ProviderSpec("cuda", {"devce_id": 0}), "unknown option 'devce_id'"),
        (ProviderSpec("qnn", {"backend": "dsp"}), "backend='dsp'"),
        (ProviderSpec("openvino", {"device": "FPGA"}), "device='FPGA'"),
    ],
)
def test_bad_provider_config_is_refused(spec: ProviderSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_providers((spec,), available=["CPUExecutionProvider"])


def test_engine_runs_on_cpu_when_board_wants_cuda(tiny_bundle: Path) -> None:
    options = RunnerOptions(
        providers=(ProviderSpec("cuda", {"device_id": 0}), ProviderSpec("cpu")), threads=1
    )
    engine = Engine.load(tiny_bundle, options)
    assert engine.runner.session.get_providers() == ["CPUExecutionProvider"]
    assert any(d.startswith("skip cuda") for d in engine.runner.plan.decisions)


@pytest.mark.parametrize("board", sorted((REPO / "configs" / "boards").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_board_profiles_load(board: Path) -> None:
    config = load_board(board)
    assert config.provider_specs()[-1].name == "cpu"  # every profile can fall back


def test_board_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    bad = tmp_path / "b.toml"
    bad.write_text("[runtime]\nthreds = 2\n")
    with pytest.raises(ConfigError, match=r"runtime: unknown key\(s\) threds"):
        load_board(bad)
    bad.write_text('[runtime]\nthreads = "two"\n')
    with pytest.raises(ConfigError, match=r"runtime\.threads: expected an integer"):
        load_board(bad)
    bad.write_text('[[providers]]\nname = "cuda"\ndevice = 0\n')
    with pytest.raises(ConfigError, match="unknown option 'device'"):
        load_board(bad)
    bad.write_text('[mqtt]\nhost = "b"\ndevice = "d"\nchunk_qos = 2\n')
    with pytest.raises(ConfigError, match="mqtt: chunk_qos must be 0 or 1"):
        load_board(bad)
    assert BoardConfig().runner_options().providers[0].name == "cpu"
