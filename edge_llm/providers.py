"""Execution providers: from a preference list in a board config to ORT session arguments.

In: an ordered tuple of `ProviderSpec` (short name + friendly options) and the providers this
onnxruntime build offers. Out: a `ProviderPlan` — the ORT provider names and option dicts to pass
to `InferenceSession`, the session-level thread settings, and one human-readable line per
decision (taken, or skipped and why). CPU is always the last resort, so a board profile written
for an NPU still runs on a laptop.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_llm.errors import ConfigError, ProviderError

log = logging.getLogger(__name__)

OptionValue = str | int | float | bool


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    options: dict[str, OptionValue] = field(default_factory=dict)


# short name -> (ORT provider name, {friendly option: ORT option key})
_PROVIDERS: dict[str, tuple[str, dict[str, str]]] = {
    "cpu": ("CPUExecutionProvider", {"arena": "use_arena"}),
    "cuda": (
        "CUDAExecutionProvider",
        {
            "device_id": "device_id",
            "gpu_mem_limit": "gpu_mem_limit",
            "arena_extend_strategy": "arena_extend_strategy",
            "cudnn_conv_algo_search": "cudnn_conv_algo_search",
            "use_tf32": "use_tf32",
        },
    ),
    "tensorrt": (
        "TensorrtExecutionProvider",
        {
            "device_id": "device_id",
            "fp16": "trt_fp16_enable",
            "int8": "trt_int8_enable",
            "engine_cache": "trt_engine_cache_enable",
            "engine_cache_path": "trt_engine_cache_path",
            "max_workspace_size": "trt_max_workspace_size",
        },
    ),
    "openvino": (
        "OpenVINOExecutionProvider",
        {
            "device": "device_type",
            "precision": "precision",
            "threads": "num_of_threads",
            "cache_dir": "cache_dir",
            # OpenVINO properties per device as a JSON object ('{"CPU": {"KEY": "VALUE"}}'):
            # what the EP has no option of its own for.
            "load_config": "load_config",
        },
    ),
    "qnn": (
        "QNNExecutionProvider",
        {
            "backend": "backend_path",
            "backend_path": "backend_path",
            "performance_mode": "htp_performance_mode",
            "graph_finalization": "htp_graph_finalization_optimization_mode",
            "soc_model": "soc_model",
            "context_cache": "ep.context_enable",
        },
    ),
    "coreml": (
        "CoreMLExecutionProvider",
        {"compute_units": "MLComputeUnits", "model_format": "ModelFormat"},
    ),
}

# QNN picks its hardware by library; boards name the unit instead of the file.
_QNN_BACKENDS = {"htp": "libQnnHtp.so", "cpu": "libQnnCpu.so", "gpu": "libQnnGpu.so"}
_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("openvino", "device"): ("CPU", "GPU", "NPU", "AUTO"),
    # What the EP accepts (CPU: FP32 or ACCURACY; GPU: FP16, FP32, ACCURACY; NPU: FP16, ACCURACY).
    ("openvino", "precision"): ("FP32", "FP16", "ACCURACY"),
    ("coreml", "compute_units"): ("ALL", "CPUOnly", "CPUAndGPU", "CPUAndNeuralEngine"),
    ("qnn", "performance_mode"): (
        "burst",
        "balanced",
        "default",
        "high_performance",
        "high_power_saver",
        "low_balanced",
        "low_power_saver",
        "power_saver",
        "sustained_high_performance",
    ),
}


# On/off options: ORT reads "1"/"0" and takes any other string without a word, so a profile's
# or --provider-option's "false" must become "0" here, and "maybe" an error.
_BOOLS = {("cpu", "arena"), ("cuda", "use_tf32"), ("tensorrt", "fp16"), ("tensorrt", "int8"),
          ("tensorrt", "engine_cache"), ("qnn", "context_cache")}  # fmt: skip
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}  # fmt: skip


@dataclass(frozen=True)
class ProviderPlan:
    providers: list[str]
    provider_options: list[dict[str, str]]
    decisions: list[str]
    # A plugin EP (edge_llm/plugin_eps.py) leads or joins: sessions get the providers by device.
    by_device: bool = False

    @property
    def chosen(self) -> str:
        return self.providers[0]

    def session_args(self, so: Any) -> dict[str, Any]:
        """InferenceSession keyword arguments for this plan (a plugin plan goes into `so`)."""
        if not self.by_device:
            return {"providers": self.providers, "provider_options": self.provider_options}
        from edge_llm import plugin_eps

        plugin_eps.add_by_device(so, self.providers, self.provider_options)
        return {}


def placement_from_profile(path: str | Path) -> dict[str, int]:
    """Nodes per execution provider from an onnxruntime profile of one run: {provider: count}.

    Every executed node (an EP's fused subgraph counts as one) has a "<node>_kernel_time" event
    naming its provider, so the CPUExecutionProvider count is the nodes that fell back to CPU.
    """
    events = json.loads(Path(path).read_text(encoding="utf-8"))
    nodes: dict[str, str] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            nodes[name.removesuffix("_kernel_time")] = str(event.get("args", {}).get("provider", "?"))
    return dict(Counter(nodes.values()))


def short_name(ort_name: str) -> str | None:
    """ "cuda" for "CUDAExecutionProvider": the name board profiles and --provider use."""
    return next((key for key, (name, _) in _PROVIDERS.items() if name == ort_name), None)


def ort_options(spec: ProviderSpec) -> tuple[str, dict[str, str]]:
    """Translate one spec into (ORT provider name, ORT option strings); reject unknown options."""
    key = spec.name.lower()
    if key not in _PROVIDERS:
        raise ConfigError(f"unknown execution provider {spec.name!r}; known: {', '.join(sorted(_PROVIDERS))}")
    ort_name, mapping = _PROVIDERS[key]
    out: dict[str, str] = {}
    for opt, value in spec.options.items():
        if opt not in mapping:
            raise ConfigError(
                f"provider {key}: unknown option {opt!r}; allowed: {', '.join(sorted(mapping))}"
            )
        allowed = _ENUMS.get((key, opt))
        if allowed and value not in allowed:
            raise ConfigError(f"provider {key}: {opt}={value!r} is not one of {', '.join(allowed)}")
        if key == "qnn" and opt == "backend":
            if value not in _QNN_BACKENDS:
                raise ConfigError(f"provider qnn: backend={value!r} is not one of htp, cpu, gpu")
            value = _QNN_BACKENDS[str(value)]
        if (key, opt) in _BOOLS:
            flag = value if isinstance(value, bool) else _BOOL_WORDS.get(str(value).strip().lower())
            if flag is None:
                raise ConfigError(f"provider {key}: {opt}={value!r} is not a boolean (true/false, 1/0)")
            value = flag
        if isinstance(value, bool):
            value = "1" if value else "0"
        out[mapping[opt]] = str(value)
    return ort_name, out


def plan_providers(specs: Sequence[ProviderSpec], available: Iterable[str] | None = None) -> ProviderPlan:
    """Keep the specs this build offers, in order, and end with the CPU fallback.

    `available` None: this process's onnxruntime, where a plugin EP whose package is installed
    (onnxruntime-qnn) is registered on first use; a list (tests): exactly those, no plugins."""
    from edge_llm import plugin_eps  # imports onnxruntime: only when a plan is made

    plugins = available is None
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    offered = set(available)
    providers: list[str] = []
    options: list[dict[str, str]] = []
    decisions: list[str] = []
    by_device = False
    for index, spec in enumerate(specs or (ProviderSpec("cpu"),)):
        ort_name, opts = ort_options(spec)  # validate even the ones we will skip
        if ort_name in providers:
            continue
        problem = None
        if ort_name not in offered or plugin_eps.is_registered(ort_name):
            problem = (
                plugin_eps.register(ort_name) if plugins else f"{ort_name} is not in this onnxruntime build"
            )
        if problem is not None:
            decisions.append(f"skip {spec.name}: {problem}")
            # The first choice missing is worth a warning even without -v: the board profile
            # (or --provider) asked for hardware this process will not use.
            log.log(logging.WARNING if index == 0 else logging.INFO, "providers: %s", decisions[-1])
            continue
        if plugin_eps.is_registered(ort_name):
            opts, by_device = plugin_eps.resolve_options(ort_name, opts), True
        providers.append(ort_name)
        options.append(opts)
        decisions.append(f"use {spec.name}: {ort_name} {opts or ''}".rstrip())
    if "CPUExecutionProvider" not in providers:
        if "CPUExecutionProvider" not in offered:
            raise ProviderError("onnxruntime offers no CPUExecutionProvider to fall back on")
        providers.append("CPUExecutionProvider")
        options.append({})
        decisions.append("use cpu: fallback for anything the providers above cannot run")
    for line in decisions:
        if not line.startswith("skip "):  # skips were logged above
            log.info("providers: %s", line)
    return ProviderPlan(providers, options, decisions, by_device)


def parse_provider_list(items: Sequence[Mapping[str, Any]]) -> tuple[ProviderSpec, ...]:
    """Build specs from TOML-like tables: {name = "qnn", backend = "htp"}."""
    specs = []
    for i, item in enumerate(items):
        item = dict(item)
        name = item.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"providers[{i}]: needs a string 'name'")
        for k, v in item.items():
            if not isinstance(v, str | int | float | bool):
                raise ConfigError(f"providers[{i}].{k}: expected a scalar, got {v!r}")
        spec = ProviderSpec(name, item)
        ort_options(spec)
        specs.append(spec)
    return tuple(specs)


def with_bundle_defaults(
    specs: Sequence[ProviderSpec], defaults: Mapping[str, Mapping[str, OptionValue]]
) -> tuple[ProviderSpec, ...]:
    """The specs over the bundle's own provider options (bundle.json `provider_options`, which
    the export target writes: e.g. openvino precision ACCURACY), so a board profile's or
    `--provider-option`'s value wins. The bundle's options are hints: one this runtime does not
    know (a newer exporter's) is skipped with a warning, never a failed load."""
    out = []
    for spec in specs:
        base: dict[str, OptionValue] = {}
        for opt, value in defaults.get(spec.name.lower(), {}).items():
            try:
                ort_options(ProviderSpec(spec.name, {opt: value}))
            except ConfigError as exc:
                log.warning("providers: bundle.json provider_options skipped: %s", exc)
                continue
            base[opt] = value
        out.append(ProviderSpec(spec.name, {**base, **spec.options}) if base else spec)
    return tuple(out)


def parse_option_overrides(items: Sequence[str]) -> dict[str, dict[str, OptionValue]]:
    """`--provider-option openvino.precision=FP32` (repeatable) as {"openvino": {"precision":
    "FP32"}}; a malformed item, an unknown provider or option, or a value outside its choices is
    refused."""
    out: dict[str, dict[str, OptionValue]] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not (name and dot and key and eq and value):
            raise ConfigError(
                f"--provider-option {item!r}: expected NAME.OPTION=VALUE (e.g. openvino.precision=FP32)"
            )
        out.setdefault(name.strip().lower(), {})[key.strip()] = value.strip()
    for name, opts in out.items():
        ort_options(ProviderSpec(name, opts))
    return out


def overlay(
    specs: Sequence[ProviderSpec], overrides: Mapping[str, Mapping[str, OptionValue]]
) -> tuple[ProviderSpec, ...]:
    """The specs with `--provider-option` values over their own; an override for a provider that
    is not in the list is refused (it would silently do nothing)."""
    names = [spec.name.lower() for spec in specs]
    missing = sorted(set(overrides) - set(names))
    if missing:
        raise ConfigError(
            f"--provider-option for {', '.join(missing)}, which is not among the providers "
            f"({', '.join(names) or 'none'}): name it in --provider or the board profile"
        )
    return tuple(ProviderSpec(s.name, {**s.options, **overrides.get(s.name.lower(), {})}) for s in specs)
