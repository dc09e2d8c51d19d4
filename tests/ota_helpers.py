"""Signed update bundles for the OTA tests and benchmarks/ota_load.py: a valid one under a new
name, and one of each kind a device must refuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from edge_llm import ota
from edge_llm.bundle import MANIFEST
from edge_llm.ota_send import archive_of


def make_update(
    tiny_bundle: Path, folder: Path, key: Path, name: str = "tiny-v2", edit: Any = None, tar: bool = True
) -> Path:
    """A signed copy of the tiny bundle under a new name (so its bundle.json sha256 differs);
    `edit(raw_manifest)` changes bundle.json before signing. Returns the tar (or the folder)."""
    out = folder / name
    shutil.copytree(tiny_bundle, out)
    raw = json.loads((out / MANIFEST).read_text())
    raw["name"] = name
    if edit is not None:
        edit(raw)
    (out / MANIFEST).write_text(json.dumps(raw, indent=1))
    ota.sign(out, key)
    return archive_of(out, folder) if tar else out


def bad_updates(tiny_bundle: Path, folder: Path, keys: tuple[Path, Path]) -> dict[str, tuple[Path, str]]:
    """name -> (archive, the refusal's words). `tiny_bundle`: any bundle (ota_load: the real one)."""
    other_key = folder / "other.key"
    ota.keygen(other_key, folder / "other.pub")
    tampered = make_update(tiny_bundle, folder, keys[0], "tampered", tar=False)
    data = tampered / "tokenizer.json"
    data.write_text(data.read_text().replace("<|im_end|>", "<|im_END|>", 1))
    whole = make_update(tiny_bundle, folder, keys[0], "whole")
    cut = folder / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    broken = make_update(tiny_bundle, folder, keys[0], "broken", tar=False)
    raw = json.loads((broken / MANIFEST).read_text())
    junk = b"not an onnx graph"
    for name in [n for n in raw["files"] if n.endswith(".onnx")]:  # every graph: a bundle with
        (broken / name).write_bytes(junk)  # variants (ragged, int8 KV) would load one of those
        raw["files"][name] = {"bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    (broken / MANIFEST).write_text(json.dumps(raw))
    ota.sign(broken, keys[0])

    def target(t: str) -> Any:
        return lambda raw: raw.setdefault("requirements", {}).update(target=t)

    def needs_ort(raw: dict[str, Any]) -> None:
        raw.setdefault("requirements", {}).update(onnxruntime="99.0.0")

    return {
        "bad signature": (make_update(tiny_bundle, folder, other_key, "other-key"), "bad signature"),
        "tampered": (archive_of(tampered, folder), r"does not load: .*tokenizer\.json: sha256 mismatch"),
        "wrong arch": (
            make_update(tiny_bundle, folder, keys[0], "qnn", target("qnn-htp")),
            "wrong architecture",
        ),
        "unmet requirements": (
            make_update(tiny_bundle, folder, keys[0], "ort99", needs_ort),
            "unmet requirements",
        ),
        "truncated archive": (cut, "truncated or damaged archive"),
        "failing self-test": (archive_of(broken, folder), "self-test failed"),
    }
