"""Each kind of broken bundle is refused with an error naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_llm.bundle import FORMAT_VERSION, load_bundle, write_manifest
from edge_llm.engine import Engine
from edge_llm.errors import BundleError


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
