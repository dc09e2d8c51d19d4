"""Provider selection: configured, validated and tested for fallback, even where not runnable."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_llm.board import BoardConfig, load_board
from edge_llm.engine import Engine
from edge_llm.errors import ConfigError
from edge_llm.providers import (
    ProviderSpec,
    ort_options,
    overlay,
    parse_option_overrides,
    plan_providers,
    with_bundle_defaults,
)
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
        (ProviderSpec("openvino", {"precision": "BF16"}), "precision='BF16'"),
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


def test_bundle_options_lie_beneath_the_profiles(caplog: pytest.LogCaptureFixture) -> None:
    """bundle.json provider_options fill in what the profile leaves out; the profile's own value
    wins; an option this runtime does not know (a newer exporter's) is skipped with a warning."""
    defaults = {"openvino": {"precision": "ACCURACY", "future_knob": 1}, "cuda": {"device_id": 3}}
    specs = (ProviderSpec("openvino", {"device": "NPU"}), ProviderSpec("cpu"))
    with caplog.at_level("WARNING", logger="edge_llm.providers"):
        out = with_bundle_defaults(specs, defaults)
    assert out == (ProviderSpec("openvino", {"precision": "ACCURACY", "device": "NPU"}), ProviderSpec("cpu"))
    assert any("future_knob" in r.getMessage() for r in caplog.records)
    mine = with_bundle_defaults((ProviderSpec("openvino", {"precision": "FP32"}),), defaults)
    assert mine[0].options == {"precision": "FP32"}


def test_provider_option_overrides_parse_and_overlay() -> None:
    overrides = parse_option_overrides(["openvino.precision=FP32", "OpenVINO.device=CPU", "cpu.arena=0"])
    assert overrides == {"openvino": {"precision": "FP32", "device": "CPU"}, "cpu": {"arena": "0"}}
    board = (ProviderSpec("openvino", {"device": "GPU", "threads": 2}), ProviderSpec("cpu"))
    specs = overlay(board, overrides)
    assert specs[0].options == {"device": "CPU", "threads": 2, "precision": "FP32"}
    assert specs[1].options == {"arena": "0"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["openvino.precision"], "expected NAME.OPTION=VALUE"),
        (["precision=FP32"], "expected NAME.OPTION=VALUE"),
        (["openvino.precison=FP32"], "unknown option 'precison'"),
        (["openvino.precision=fp64"], "precision='fp64' is not one of"),
        (["tpu.x=1"], "unknown execution provider 'tpu'"),
        (["cpu.arena=maybe"], "arena='maybe' is not a boolean"),
        (["tensorrt.fp16=2"], "fp16='2' is not a boolean"),
    ],
)
def test_bad_provider_option_is_refused(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_option_overrides(items)


@pytest.mark.parametrize(
    ("word", "ort"),
    [("false", "0"), ("No", "0"), ("0", "0"), ("off", "0"), ("true", "1"), ("YES", "1"), ("1", "1")],
)
def test_a_boolean_option_given_as_a_word_reaches_ort_as_1_or_0(word: str, ort: str) -> None:
    # ORT takes use_arena="false" without complaint; it reads only "1"/"0".
    overrides = parse_option_overrides([f"cpu.arena={word}", f"qnn.context_cache={word}"])
    assert ort_options(ProviderSpec("cpu", overrides["cpu"]))[1] == {"use_arena": ort}
    assert ort_options(ProviderSpec("qnn", overrides["qnn"]))[1] == {"ep.context_enable": ort}


def test_provider_option_for_a_provider_not_in_the_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="for openvino, which is not among the providers"):
        overlay((ProviderSpec("cpu"),), {"openvino": {"precision": "FP32"}})


def test_bundle_provider_options_reach_the_session(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options given to InferenceSession are the bundle's under the board's / the flag's."""
    import json
    import shutil

    import edge_llm.runner as runner_mod

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["provider_options"] = {"cpu": {"arena": False}}  # bundle.json is not a listed file
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    seen: list[dict] = []
    real = runner_mod.ort.InferenceSession

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(dict(kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod.ort, "InferenceSession", spy)
    Engine.load(bundle, RunnerOptions(threads=1))
    assert seen[-1]["providers"] == ["CPUExecutionProvider"]
    assert seen[-1]["provider_options"] == [{"use_arena": "0"}]
    flagged = overlay((ProviderSpec("cpu"),), parse_option_overrides(["cpu.arena=1"]))
    Engine.load(bundle, RunnerOptions(threads=1, providers=flagged))
    assert seen[-1]["provider_options"] == [{"use_arena": "1"}]
