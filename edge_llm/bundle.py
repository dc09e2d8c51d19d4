"""The bundle: a self-describing model folder, and the only thing the runtime loads.

In: a folder holding the ONNX graph (+ external data), `tokenizer.json` and `bundle.json`.
Out: a verified `Bundle` (frozen) describing everything the engine needs — architecture facts,
graph IO names, KV layout, token ids, chat template, quantization, source and recipe.

`bundle.json` is versioned (`format_version`); a loader never guesses a format from a file
name. Loading refuses a missing file, a checksum mismatch, an unknown format version, or a
graph whose IO disagrees with the manifest, naming the file and what is wrong.

Compatibility: boards update over the air bundle first, so an older runtime meets bundles
written by a newer exporter. The rule for changing the format:
- A field an older runtime may ignore and still run the graph correctly (a hint, a speed-up, a
  compiled graph beside the plain one, documentation) is added anywhere outside `requirements`
  without bumping `format_version`: a runtime ignores fields it does not know there, logging
  their names at debug level.
- What a runtime must understand to run the graph correctly goes under `requirements`, which
  is strict: an unknown requirement refuses the load. Its `onnxruntime` is checked before a
  session starts; its `edge_llm` names the lowest runtime that reads the bundle right, and an
  older one refuses at load, in one line: "this bundle needs edge-llm ≥ X (found Y): update the
  runtime or re-export". An exporter sets it when it writes something older runtimes would
  misread; `write_manifest` leaves it out while empty, so runtimes that predate it load the
  bundles that do not need it.
- A change every reader must know about (a field changing meaning, a layout rewritten) bumps
  `format_version`, which a runtime refuses unless it reads that version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from edge_llm import __version__
from edge_llm.chat import ChatFormat
from edge_llm.errors import BundleError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
# Documentation the export writes beside the model. A board may delete these to save flash, so
# loading skips them when absent; when present they are still checked like every other file.
OPTIONAL_FILES = frozenset({"report.json", "report.md", "report.png"})
# What the cpu target's fused graph needs (export/targets.py derives it from the graph's ops;
# tests/edge_llm/test_requirements.py checks the two agree). Also pyproject's onnxruntime floor.
PORTABLE_CPU_ORT = "1.23.2"
# The first runtime that reads `graph.kv_spare`: a bundle with kv_spare > 0 requires it.
KV_SPARE_RUNTIME = "0.2.0"
# The padded graph's switch (export/variants.py `pad_query_row`): an int32 scalar input, 1 = every
# GroupQueryAttention node gets a dummy query row, 0 = none. The first runtime that feeds it is
# PAD_SWITCH_RUNTIME: a bundle whose graph has the input requires it (older ones would not feed it).
PAD_INPUT = "query_pad"
PAD_SWITCH_RUNTIME = "0.3.0"
# The first runtime that runs a draft of kind "eagle1" (its own KV cache): older ones would feed
# it as the stateless kind and fail at its first draft step, so such a bundle requires it.
EAGLE1_RUNTIME = "0.3.0"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    parameters: int = 0


@dataclass(frozen=True)
class DraftSpec:
    """A speculative-decoding draft shipped beside the main graph (`export/train_draft.py`).

    The main graph then also outputs `hidden_states` [B, K, hidden] (the final-normed hidden
    state the LM head reads, for the same K positions as its logits). `file` is a stateless
    graph: `hidden` float32 [N, hidden] + `input_ids` int64 [N] (full-vocabulary ids: the token
    that follows that hidden state) -> `feature` float32 [N, hidden] (its guess of the main
    graph's next hidden state, fed back for the next draft step) and `logits` float32
    [N, len(vocab) + 1] over the draft vocabulary; row i is token `vocab[i]`, the last column
    belongs to the out-of-vocabulary input row and is never proposed.
    """

    file: str
    vocab: tuple[int, ...]
    kind: str = "feature-mlp"


@dataclass(frozen=True)
class GraphSpec:
    """How to drive the graph.

    kv_layout "concat": past has shape [B, kv, P, d] and present [B, kv, P+S, d] (optimum).
    kv_layout "shared": past and present are one preallocated [B, kv, max_ctx, d] buffer (GQA).
    kv_layout "static": fixed shapes (NPUs): `file` decodes 1 token, `prefill_file` takes
    `prefill_length`, both over a past of exactly `past_length` positions; presents are the new
    positions only.
    """

    file: str
    kv_layout: Literal["concat", "shared", "static"]
    logits: Literal["all", "last", "tail"]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    prefill_file: str = ""  # static only
    prefill_length: int = 0
    past_length: int = 0
    # Graphs compiled ahead of time for one provider (target qnn-htp: QNN EPContext models with
    # the HTP context binary inside): graph file -> its compiled model, which the runtime loads
    # instead when `context_provider` leads the session; the plain graphs stay for CPU fallback.
    contexts: dict[str, str] = field(default_factory=dict)
    context_provider: str = ""
    # The KV element type of `file` ("fp32", or "int8": static per-channel scales in the graph).
    kv_cache: str = "fp32"
    # Other graphs over the same weights (export/variants.py): file -> {"kv_cache": "fp32" |
    # "int8", "query_seqlens": bool (GQA's per-row new-token counts: an extra int32 input)}. The
    # runner picks one at load (`[runtime] kv_cache`, the onnxruntime build: see
    # `Requirements.graphs`); absent: `file` is the only graph.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    draft: DraftSpec | None = None  # a trained speculative draft (absent: none in the bundle)
    # KV positions each forward writes past its new tokens, in every graph of the bundle: 1 where
    # GroupQueryAttention gets a dummy query row (export/variants.py, `[fuse] pad_query_row`: a
    # 1-token decode then gives a speculative verify's logits bit for bit). The runtime's shared KV
    # buffers hold that many positions more than a sequence may fill. Absent (older bundles): 0.
    # A runtime that predates it runs such a graph correctly until a sequence fills its buffer,
    # where onnxruntime refuses the forward (GQA's present shape) instead of a clean "context full":
    # so the export also sets `requirements.edge_llm` to KV_SPARE_RUNTIME, and those refuse it.
    # Since PAD_SWITCH_RUNTIME the dummy is switched by the graph input PAD_INPUT (in `inputs`):
    # the runtime pads forwards of one row (where speculation runs) and not batched ones.
    kv_spare: int = 0


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    chat_template: str | None
    add_bos: bool = False
    # The template as plain strings (`edge_llm.chat.ChatFormat`), when it is that simple: the
    # runtime then renders chats without jinja2. Absent in older bundles.
    chat_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class Requirements:
    """What the graph needs from the runtime (bundle.json `requirements`, written at export).

    onnxruntime: the lowest onnxruntime version that runs every op of the graph as written
        (derived at export from the ops actually present, `export/targets.py`).
    contrib_ops: "domain:op" of every non-standard op in the graph(s).
    target: the `--target` the bundle was built for (cpu, openvino, qnn-htp, cuda).
    edge_llm: the lowest edge-llm runtime that reads this bundle correctly ("": any that loads
        it); see the compatibility rule above.
    """

    onnxruntime: str = ""
    contrib_ops: tuple[str, ...] = ()
    target: str = "cpu"
    edge_llm: str = field(default="", metadata={"omit_empty": True})
    # Variant graphs that need a newer onnxruntime than `onnxruntime` (file -> version): the
    # runtime uses one only on that build or newer, so the bundle still loads on older ones.
    graphs: dict[str, str] = field(default_factory=dict, metadata={"omit_empty": True})


@dataclass(frozen=True)
class Bundle:
    path: Path
    format_version: int
    name: str
    architecture: Architecture
    graph: GraphSpec
    tokenizer: TokenizerSpec
    quantization: dict[str, Any]
    source: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # None in bundles written before requirements were recorded: they load unchecked.
    requirements: Requirements | None = None
    # Execution-provider options the graph was measured with, by short name ({"openvino":
    # {"precision": "ACCURACY"}}: export/targets.py says why). The runtime puts a board profile's
    # and --provider-option's values over them; a hint, so an older runtime may ignore it.
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"omit_empty": True})

    @property
    def graph_path(self) -> Path:
        return self.path / self.graph.file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.tokenizer.file

    def size_bytes(self) -> int:
        return sum(int(meta["bytes"]) for meta in self.files.values())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read and check `path/bundle.json`; with `verify`, check every file's size and sha256."""
    root = Path(path)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; is {root} a bundle written by `edge-llm export`?")
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest}: unknown format_version {version!r}; this runtime (edge-llm {__version__}) "
            f"reads {FORMAT_VERSION}: update the runtime or re-export"
        )
    ignored: list[str] = []
    try:
        _check_runtime(raw.get("requirements"))  # first: a newer bundle may not parse here
        bundle = Bundle(
            path=root,
            format_version=version,
            name=str(raw["name"]),
            architecture=_known(Architecture, raw["architecture"], "architecture", ignored),
            graph=_graph_spec(raw["graph"], ignored),
            tokenizer=_tokenizer_spec(raw["tokenizer"], ignored),
            quantization=dict(raw.get("quantization", {})),
            source=dict(raw.get("source", {})),
            recipe=dict(raw.get("recipe", {})),
            files=dict(raw["files"]),
            requirements=_requirements(raw["requirements"]) if "requirements" in raw else None,
            provider_options=_provider_options(raw.get("provider_options", {})),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{manifest}: malformed manifest ({exc!s})") from None
    except _NeedsNewer as exc:
        raise BundleError(f"{manifest}: {exc}") from None
    ignored += sorted(set(raw) - {f.name for f in fields(Bundle)})
    if ignored:  # additive fields from a newer exporter (the compatibility rule above)
        log.debug("%s: ignoring fields this runtime does not know: %s", manifest, ", ".join(ignored))
    for needed in (
        bundle.graph.file,
        bundle.graph.prefill_file,
        bundle.tokenizer.file,
        bundle.graph.draft.file if bundle.graph.draft else "",
        *bundle.graph.contexts.values(),
        *bundle.graph.variants,
    ):
        if needed and needed not in bundle.files:
            raise BundleError(f"{manifest}: {needed} is not listed under 'files'")
    present = {
        name: meta
        for name, meta in bundle.files.items()
        if name not in OPTIONAL_FILES or (root / name).is_file()
    }
    stamp = _stamp(root, present)
    already = verify and stamp is not None and _verified_before(root, stamp)
    for name, meta in present.items():
        _check_file(root, name, meta, verify and not already)
    if verify and not already and stamp is not None:
        _remember_verified(root, stamp)
    return bundle


# Hashing a 270 MB bundle costs ~0.4 s of every start on a small board. Once every file has
# matched its sha256, we remember (path, size, mtime, inode) per file in the user cache and hash
# again only when any of them changes: corruption on disk or a replaced file is still caught,
# a board restart is not slowed down.
def _stamp(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    parts = []
    for name in sorted(files):
        try:
            st = (root / name).stat()
        except OSError:
            return None
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{files[name]['sha256']}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _stamp_file(root: Path) -> Path:
    cache = Path(os.environ.get("EDGE_LLM_CACHE", Path.home() / ".cache" / "edge-llm"))
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache / "verified" / key


def _verified_before(root: Path, stamp: str) -> bool:
    try:
        return _stamp_file(root).read_text().strip() == stamp
    except OSError:
        return False


def _remember_verified(root: Path, stamp: str) -> None:
    path = _stamp_file(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stamp + "\n")
    except OSError:  # a read-only home just means hashing every time
        pass


class _NeedsNewer(Exception):
    """The manifest asks for a newer runtime (the message says which and what to do)."""


def _known(cls: type[Any], raw: dict[str, Any], section: str, ignored: list[str]) -> Any:
    """`cls(**raw)` with only the fields `cls` has; the others are named in `ignored`."""
    names = {f.name for f in fields(cls)}
    ignored += [f"{section}.{key}" for key in sorted(set(raw) - names)]
    return cls(**{k: v for k, v in raw.items() if k in names})


def _check_runtime(raw: Any) -> None:
    """Refuse a bundle whose `requirements.edge_llm` is newer than this runtime, and one that has
    a requirement this runtime does not know (it cannot tell whether it meets it)."""
    if not isinstance(raw, dict):
        return  # absent (older bundles), or malformed: `_requirements` says so
    needs = raw.get("edge_llm")
    if needs and version_tuple(str(needs)) > version_tuple(__version__):
        raise _NeedsNewer(
            f"this bundle needs edge-llm ≥ {needs} (found {__version__}): update the runtime or re-export"
        )
    unknown = sorted(set(raw) - {f.name for f in fields(Requirements)})
    if unknown:
        raise _NeedsNewer(
            f"requirements {', '.join(unknown)} unknown to this runtime (edge-llm {__version__}): "
            "update the runtime or re-export"
        )


def _graph_spec(raw: dict[str, Any], ignored: list[str]) -> GraphSpec:
    raw = dict(raw)
    raw["inputs"] = tuple(raw["inputs"])
    raw["outputs"] = tuple(raw["outputs"])
    raw["contexts"] = {str(k): str(v) for k, v in dict(raw.get("contexts", {})).items()}
    raw["variants"] = {str(k): dict(v) for k, v in dict(raw.get("variants", {})).items()}
    for name, v in raw["variants"].items():
        if v.get("kv_cache") not in ("fp32", "int8") or not isinstance(v.get("query_seqlens"), bool):
            raise TypeError(f"graph.variants[{name!r}]: kv_cache 'fp32'|'int8', query_seqlens true|false")
    if not isinstance(raw.get("kv_spare", 0), int) or raw.get("kv_spare", 0) < 0:
        raise TypeError(f"graph.kv_spare must be a count of positions (>= 0), not {raw.get('kv_spare')!r}")
    if raw.get("kv_cache", "fp32") not in ("fp32", "int8"):
        raise TypeError(f"graph.kv_cache must be 'fp32' or 'int8', not {raw.get('kv_cache')!r}")
    if raw.get("draft") is not None:
        draft = dict(raw["draft"])
        raw["draft"] = DraftSpec(**{**draft, "vocab": tuple(int(i) for i in draft["vocab"])})
    if raw.get("kv_layout") not in ("concat", "shared", "static"):
        raise TypeError(
            f"graph.kv_layout must be 'concat', 'shared' or 'static', not {raw.get('kv_layout')!r}"
        )
    return _known(GraphSpec, raw, "graph", ignored)


def _provider_options(raw: Any) -> dict[str, dict[str, Any]]:
    """{provider: {option: scalar}}; what the options mean is checked where they are applied
    (`edge_llm.providers.with_bundle_defaults`), since a newer exporter may know more of them."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise TypeError("provider_options must map provider names to objects of options")
    for name, opts in raw.items():
        for key, value in opts.items():
            if not isinstance(value, str | int | float | bool):
                raise TypeError(f"provider_options.{name}.{key}: expected a scalar, got {value!r}")
    return {str(k): dict(v) for k, v in raw.items()}


def _requirements(raw: dict[str, Any]) -> Requirements:
    raw = dict(raw)
    raw["contrib_ops"] = tuple(str(op) for op in raw.get("contrib_ops", ()))
    raw["graphs"] = {str(k): str(v) for k, v in dict(raw.get("graphs", {})).items()}
    req = Requirements(**raw)
    for version in (req.onnxruntime, *req.graphs.values()):
        if version:
            version_tuple(version)  # a malformed version fails the load, not a session
    return req


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 23, 2) from "1.23.2" (also "1.24.1+openvino", "1.33.0.dev2026"): numeric parts only."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise TypeError(f"not a version: {version!r}")
    return tuple(parts)


def requirements_problem(bundle: Bundle, ort_version: str) -> str | None:
    """Why this onnxruntime cannot run the bundle's graph (one line), or None if it can."""
    req = bundle.requirements
    if req is None or not req.onnxruntime:
        return None
    if version_tuple(ort_version) >= version_tuple(req.onnxruntime):
        return None
    # The cpu target writes the portable graph: re-exporting helps when this build runs that one.
    if version_tuple(ort_version) >= version_tuple(PORTABLE_CPU_ORT):
        hint = "upgrade, or re-export with --target cpu"
    else:
        hint = f"upgrade (no target runs on onnxruntime < {PORTABLE_CPU_ORT})"
    return f"this bundle needs onnxruntime ≥ {req.onnxruntime}; found {ort_version}: {hint}"


def choose_graph(bundle: Bundle, kv_cache: str, ragged: bool, ort_version: str) -> tuple[str, dict[str, Any]]:
    """The graph file to run and its variant record ({"kv_cache", "query_seqlens"}): one whose
    KV type is `kv_cache` ("auto": the main graph's), preferring the query_seqlens graph when
    `ragged` and this onnxruntime runs it (`Requirements.graphs`), else the portable one."""
    g = bundle.graph
    graphs = {g.file: {"kv_cache": g.kv_cache, "query_seqlens": "query_seqlens" in g.inputs}, **g.variants}
    want = g.kv_cache if kv_cache == "auto" else kv_cache
    fits = [f for f, v in graphs.items() if v["kv_cache"] == want]
    if not fits:
        kinds = sorted({v["kv_cache"] for v in graphs.values()})
        raise BundleError(
            f"{bundle.path}: no graph with a {want} KV cache (it has {', '.join(kinds)}); set [runtime] "
            f'kv_cache to one of those, or re-export with [fuse] kv_cache = "{want}" (or "both")'
        )
    need = bundle.requirements.graphs if bundle.requirements is not None else {}
    have = version_tuple(ort_version)
    runnable = [f for f in fits if have >= version_tuple(need.get(f, "0"))]
    if not runnable:
        raise BundleError(
            f"{bundle.path}: its {want}-KV graph needs onnxruntime ≥ {min(need[f] for f in fits)}; "
            f"found {ort_version}: upgrade, or choose another [runtime] kv_cache"
        )
    plain = [f for f in runnable if not graphs[f]["query_seqlens"]]
    ragged_ok = [f for f in runnable if graphs[f]["query_seqlens"]]
    pick = (ragged_ok if ragged and ragged_ok else plain or runnable)[0]
    return pick, graphs[pick]


def check_requirements(bundle: Bundle, ort_version: str) -> None:
    """Refuse, before any session is created, a bundle whose graph this onnxruntime cannot run."""
    problem = requirements_problem(bundle, ort_version)
    if problem is not None:
        raise BundleError(f"{bundle.path}: {problem}")


def _tokenizer_spec(raw: dict[str, Any], ignored: list[str]) -> TokenizerSpec:
    raw = dict(raw)
    raw["eos_ids"] = tuple(int(i) for i in raw["eos_ids"])
    if raw.get("chat_format") is not None:
        ChatFormat.from_dict(raw["chat_format"])  # a malformed one fails the load, not a request
    return _known(TokenizerSpec, raw, "tokenizer", ignored)


def _check_file(root: Path, name: str, meta: dict[str, Any], verify: bool) -> None:
    path = root / name
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST} but missing")
    size = path.stat().st_size
    if size != int(meta["bytes"]):
        raise BundleError(f"{path}: size {size} bytes, {MANIFEST} says {meta['bytes']}")
    if verify:
        digest = sha256_file(path)
        if digest != meta["sha256"]:
            raise BundleError(
                f"{path}: sha256 mismatch (file {digest[:12]}…, {MANIFEST} {meta['sha256'][:12]}…)"
            )


def check_graph_io(
    bundle: Bundle,
    input_names: list[str],
    output_names: list[str],
    extra_inputs: tuple[str, ...] = (),
    variant: bool = False,
) -> None:
    """Refuse a graph whose inputs/outputs differ from what the manifest promises (plus
    `extra_inputs`: a variant's, e.g. query_seqlens). A `variant` graph has no `hidden_states`
    output: the draft stage, which runs after the variants, adds it to the main graph only."""
    want_in, want_out = set(bundle.graph.inputs) | set(extra_inputs), set(bundle.graph.outputs)
    if variant:
        want_out.discard("hidden_states")
    got_in, got_out = set(input_names), set(output_names)
    problems = []
    if want_in != got_in:
        problems.append(
            f"inputs differ (missing {sorted(want_in - got_in)}, unexpected {sorted(got_in - want_in)})"
        )
    if want_out != got_out:
        problems.append(
            f"outputs differ (missing {sorted(want_out - got_out)}, unexpected {sorted(got_out - want_out)})"
        )
    if problems:
        raise BundleError(f"{bundle.graph_path}: graph IO does not match {MANIFEST}: " + "; ".join(problems))


def write_manifest(bundle: Bundle) -> Path:
    """Write `bundle.path/bundle.json` from the `Bundle`: every field but `path` (the folder) and
    `files`, which is filled here with the size and sha256 of every file in the folder.

    The dataclasses above are the one description of the format: the exporter builds a `Bundle`
    and this writes its fields as they are, so a new field needs no change here."""
    root = bundle.path
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    data = {
        f.name: getattr(bundle, f.name)
        for f in fields(bundle)
        if f.name != "path" and (getattr(bundle, f.name) or not f.metadata.get("omit_empty"))
    }
    data["files"] = files
    out = root / MANIFEST
    out.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        # An empty `omit_empty` field stays out: runtimes that predate it refuse a manifest that
        # has it (requirements are strict), so only bundles that need it may carry it.
        return {
            f.name: getattr(obj, f.name)
            for f in fields(obj)
            if getattr(obj, f.name) or not f.metadata.get("omit_empty")
        }
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
