"""Each kind of broken bundle is refused with an error naming the file and the problem."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from edge_llm import __version__
from edge_llm.bundle import FORMAT_VERSION, load_bundle, write_manifest
from edge_llm.engine import Engine
from edge_llm.errors import BundleError
from edge_llm.sampling import SamplingParams


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def _edit_manifest(root: Path, change) -> None:
    path = root / "bundle.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_good_bundle_describes_itself(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert b.format_version == FORMAT_VERSION
    assert b.architecture.num_layers == 2 and b.architecture.num_kv_heads == 2
    assert b.architecture.head_dim == 16 and b.architecture.parameters > 0
    assert b.graph.kv_layout == "concat"
    assert "input_ids" in b.graph.inputs and "logits" in b.graph.outputs
    assert b.tokenizer.eos_ids[0] == 2 and b.tokenizer.chat_template
    assert set(b.files) >= {"model.onnx", "tokenizer.json"}
    assert all(len(meta["sha256"]) == 64 for meta in b.files.values())
    assert b.source["kind"] == "folder"


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: listed in bundle\.json but missing"):
        load_bundle(bundle_copy)


def test_report_files_are_optional_but_checked_when_present(bundle_copy: Path) -> None:
    """A board may drop the documentation (report.*) to save space; a model file it may not."""
    bundle = load_bundle(bundle_copy)
    (bundle_copy / "report.md").write_text("# report\n")
    (bundle_copy / "report.json").write_text("{}\n")
    manifest = json.loads((bundle_copy / "bundle.json").read_text())
    write_manifest(bundle)  # re-list the folder with the new reports
    assert {"report.md", "report.json"} <= set(load_bundle(bundle_copy).files)
    (bundle_copy / "report.md").write_text("# edited by hand\n")
    with pytest.raises(BundleError, match=r"report\.md: size"):
        load_bundle(bundle_copy)
    (bundle_copy / "report.md").unlink()
    (bundle_copy / "report.json").unlink()
    assert load_bundle(bundle_copy).name == manifest["name"]
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: listed in bundle\.json but missing"):
        load_bundle(bundle_copy)


def test_checksum_mismatch(bundle_copy: Path) -> None:
    tok = bundle_copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[10] ^= 0x01  # same size, different content
    tok.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tokenizer\.json: sha256 mismatch"):
        load_bundle(bundle_copy)


def test_size_mismatch(bundle_copy: Path) -> None:
    with (bundle_copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: size"):
        load_bundle(bundle_copy)


def test_unknown_format_version(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="unknown format_version 99"):
        load_bundle(bundle_copy)


def test_missing_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json: missing"):
        load_bundle(bundle_copy)


def test_manifest_not_json(bundle_copy: Path) -> None:
    (bundle_copy / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_manifest_missing_section(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d.pop("architecture"))
    with pytest.raises(BundleError, match="malformed manifest"):
        load_bundle(bundle_copy)


def test_graph_io_mismatch(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d["graph"]["inputs"].append("token_type_ids"))
    with pytest.raises(BundleError, match=r"model\.onnx: graph IO does not match.*token_type_ids"):
        Engine.load(bundle_copy)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nope")


def test_remembered_verification_still_catches_a_changed_file(bundle_copy: Path) -> None:
    load_bundle(bundle_copy)  # full hash; remembered for this exact set of files
    load_bundle(bundle_copy)  # unchanged: trusted without hashing
    tok = bundle_copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[20] ^= 0x01
    tok.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle_copy)


def test_fields_a_newer_exporter_added_are_ignored_and_named_in_the_debug_log(
    tiny_bundle: Path, bundle_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Boards update bundle first: an older runtime loads a bundle with additive fields it does
    not know (same format_version), runs it, and logs which fields it ignored."""

    def add(d: dict) -> None:
        d["provenance"] = {"signed_by": "ci"}
        d["graph"]["kv_hint"] = "page-16"
        d["tokenizer"]["normalizer_note"] = "nfc"
        d["architecture"]["rope_note"] = "default"

    _edit_manifest(bundle_copy, add)
    with caplog.at_level(logging.DEBUG, logger="edge_llm.bundle"):
        bundle = load_bundle(bundle_copy)
    original = load_bundle(tiny_bundle)
    assert (bundle.architecture, bundle.graph, bundle.tokenizer) == (
        original.architecture,
        original.graph,
        original.tokenizer,
    )
    named = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(named) == 1
    for field_name in ("architecture.rope_note", "graph.kv_hint", "tokenizer.normalizer_note", "provenance"):
        assert field_name in named[0]
    engine = Engine.load(bundle_copy)
    ids = engine.encode_request(prompt="hello")
    assert engine.complete(ids, SamplingParams(max_tokens=3, ignore_eos=True)).usage.completion_tokens == 3


def test_a_bundle_for_a_newer_runtime_is_refused_in_one_line(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, lambda d: d["requirements"].update(edge_llm="99.1"))
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle_copy)
    message = f"this bundle needs edge-llm ≥ 99.1 (found {__version__}): update the runtime or re-export"
    assert str(refused.value).endswith(message) and "\n" not in str(refused.value)
    # Refused before the rest is read: a newer bundle's sections may not parse here at all.
    _edit_manifest(bundle_copy, lambda d: d["graph"].update(kv_layout="paged"))
    with pytest.raises(BundleError, match=r"needs edge-llm ≥ 99\.1"):
        load_bundle(bundle_copy)
    _edit_manifest(bundle_copy, lambda d: d["graph"].update(kv_layout="concat"))
    _edit_manifest(bundle_copy, lambda d: d["requirements"].update(edge_llm=__version__))
    assert load_bundle(bundle_copy).requirements.edge_llm == __version__


def test_a_requirement_this_runtime_does_not_know_refuses_the_load(bundle_copy: Path) -> None:
    """`requirements` is the strict section: an unknown one may be unmet, so it is not ignored."""
    _edit_manifest(bundle_copy, lambda d: d["requirements"].update(npu_sdk="2.40"))
    with pytest.raises(
        BundleError, match=r"requirements npu_sdk unknown to this runtime.*update the runtime"
    ):
        load_bundle(bundle_copy)


def test_the_runtime_requirement_is_written_only_when_set(bundle_copy: Path) -> None:
    """Runtimes that predate `requirements.edge_llm` refuse an unknown requirement, so bundles
    that do not need a newer runtime must not carry the field at all."""
    bundle = load_bundle(bundle_copy)
    assert bundle.requirements is not None
    write_manifest(bundle)
    assert "edge_llm" not in json.loads((bundle_copy / "bundle.json").read_text())["requirements"]
    assert load_bundle(bundle_copy) == bundle
    newer = dataclasses.replace(
        bundle, requirements=dataclasses.replace(bundle.requirements, edge_llm="0.0.9")
    )
    write_manifest(newer)
    assert json.loads((bundle_copy / "bundle.json").read_text())["requirements"]["edge_llm"] == "0.0.9"
    assert load_bundle(bundle_copy) == newer


def test_provider_options_round_trip_and_are_written_only_when_set(bundle_copy: Path) -> None:
    bundle = load_bundle(bundle_copy)
    assert bundle.provider_options == {}
    write_manifest(bundle)
    assert "provider_options" not in json.loads((bundle_copy / "bundle.json").read_text())
    tuned = dataclasses.replace(bundle, provider_options={"openvino": {"precision": "ACCURACY"}})
    write_manifest(tuned)
    assert json.loads((bundle_copy / "bundle.json").read_text())["provider_options"] == {
        "openvino": {"precision": "ACCURACY"}
    }
    assert load_bundle(bundle_copy) == tuned


@pytest.mark.parametrize(
    "bad", [["precision"], {"openvino": "ACCURACY"}, {"openvino": {"precision": ["ACCURACY"]}}]
)
def test_malformed_provider_options_are_refused(bundle_copy: Path, bad: object) -> None:
    _edit_manifest(bundle_copy, lambda d: d.update(provider_options=bad))
    with pytest.raises(BundleError, match=r"malformed manifest.*provider_options"):
        load_bundle(bundle_copy)
