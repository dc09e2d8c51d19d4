"""Signed bundle updates into A/B slots: valid, tampered, truncated, wrong key, failing self-test."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge_llm import ota
from edge_llm.bundle import load_bundle, write_manifest
from edge_llm.errors import UpdateError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from ota_helpers import make_update


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    private, public = tmp_path / "ota.key", tmp_path / "ota.pub"
    ota.keygen(private, public)
    return private, public


@pytest.fixture
def signed(tiny_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    update = tmp_path / "update"
    shutil.copytree(tiny_bundle, update)
    ota.sign(update, keys[0])
    return update


@pytest.fixture
def prefix(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A board as install.sh leaves it: PREFIX/bundle is a plain folder."""
    root = tmp_path / "prefix"
    root.mkdir()
    shutil.copytree(tiny_bundle, root / "bundle")
    return root


def _rehash(bundle: Path, like: Path) -> None:
    """Rewrite `bundle`'s bundle.json (sizes and hashes of its files as they are now)."""
    sig = bundle / ota.SIGNATURE
    kept = sig.read_bytes() if sig.exists() else None
    sig.unlink(missing_ok=True)  # write_manifest lists every file present; the old signature stays
    write_manifest(dataclasses.replace(load_bundle(like, verify=False), path=bundle))
    if kept is not None:
        sig.write_bytes(kept)


def _serving(prefix: Path) -> str:
    """What the service would load now, and proof that it still loads and answers."""
    ota.self_test(prefix / "bundle", max_tokens=2)
    return ota.Slots(prefix).active() or "plain"


def test_keygen_writes_a_private_key_only_we_read_and_refuses_to_overwrite(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(UpdateError, match="refusing to overwrite"):
        ota.keygen(private, public.with_name("other.pub"))


def test_a_valid_update_switches_slots_and_rollback_goes_back(
    prefix: Path, signed: Path, keys: tuple[Path, Path]
) -> None:
    first = ota.apply_update(prefix, signed, keys[1])
    assert (first.slot, first.previous) == ("b", "a")  # the first install was adopted as slot a
    assert (prefix / "bundle").is_symlink() and _serving(prefix) == "b"
    assert len(first.sha256) == 64 and first.answer
    second = ota.apply_update(prefix, signed, keys[1])
    assert (second.slot, second.previous) == ("a", "b")
    assert ota.rollback(prefix) == "b" and _serving(prefix) == "b"
    load_bundle(prefix / "bundle")


def test_a_tar_update_is_taken_too(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    archive = tmp_path / "update.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(signed, arcname="tiny")
    assert ota.apply_update(prefix, archive, keys[1]).slot == "b"


def test_a_tampered_file_is_refused_and_the_old_bundle_keeps_serving(
    prefix: Path, signed: Path, keys: tuple[Path, Path]
) -> None:
    data = signed / "tokenizer.json"
    data.write_text(data.read_text().replace("<|im_end|>", "<|im_END|>", 1))
    with pytest.raises(UpdateError, match=r"does not load: .*tokenizer\.json: sha256 mismatch"):
        ota.apply_update(prefix, signed, keys[1])
    assert _serving(prefix) == "a"
    assert not (prefix / "slots" / "b").exists()  # the staged copy is gone


def test_a_re_hashed_manifest_fails_the_signature(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tiny_bundle: Path
) -> None:
    (signed / "tokenizer.json").write_text("{}")
    _rehash(signed, tiny_bundle)  # hashes now match the tampered file
    with pytest.raises(UpdateError, match="bad signature"):
        ota.apply_update(prefix, signed, keys[1])
    assert _serving(prefix) == "a"


def test_another_key_or_no_signature_is_refused(
    prefix: Path, signed: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    ota.keygen(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(UpdateError, match="bad signature"):
        ota.apply_update(prefix, signed, tmp_path / "other.pub")
    (signed / ota.SIGNATURE).unlink()
    with pytest.raises(UpdateError, match="unsigned bundles are refused"):
        ota.apply_update(prefix, signed, keys[1])
    assert _serving(prefix) == "a"


def test_an_unlisted_file_is_refused(prefix: Path, signed: Path, keys: tuple[Path, Path]) -> None:
    (signed / "extra.py").write_text("import os\n")
    with pytest.raises(UpdateError, match=r"not listed in bundle\.json"):
        ota.apply_update(prefix, signed, keys[1])


def test_a_truncated_transfer_is_refused(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    archive = tmp_path / "update.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(signed, arcname="tiny")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UpdateError, match=r"truncated|does not load"):
        ota.apply_update(prefix, cut, keys[1])
    assert _serving(prefix) == "a"


def test_an_update_for_a_newer_runtime_is_refused_and_the_old_bundle_keeps_serving(
    prefix: Path, signed: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boards update bundle first: a bundle that needs a newer edge-llm (requirements.edge_llm)
    is refused before its self-test, in one line saying what to do."""
    bundle = load_bundle(signed, verify=False)
    assert bundle.requirements is not None
    newer = dataclasses.replace(bundle.requirements, edge_llm="99.0")
    (signed / ota.SIGNATURE).unlink()
    write_manifest(dataclasses.replace(bundle, requirements=newer))
    with monkeypatch.context() as workstation:  # signed where edge-llm 99.0 is installed
        workstation.setattr("edge_llm.bundle.__version__", "99.0")
        ota.sign(signed, keys[0])
    with pytest.raises(
        UpdateError, match=r"needs edge-llm ≥ 99\.0 \(found .*\): update the runtime or re-export"
    ):
        ota.apply_update(prefix, signed, keys[1])
    assert _serving(prefix) == "a"


def test_a_failing_self_test_leaves_the_old_bundle_active(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tiny_bundle: Path
) -> None:
    # A signed bundle whose graph does not run: its signature and hashes are fine.
    (signed / "model.onnx").write_bytes(b"not an onnx graph")
    _rehash(signed, tiny_bundle)
    ota.sign(signed, keys[0])
    with pytest.raises(UpdateError, match="self-test failed"):
        ota.apply_update(prefix, signed, keys[1])
    assert _serving(prefix) == "a"


def test_a_refused_update_keeps_the_bundle_a_rollback_goes_back_to(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tiny_bundle: Path, tmp_path: Path
) -> None:
    assert ota.apply_update(prefix, signed, keys[1]).slot == "b"  # slot a: the first install
    broken = tmp_path / "broken"
    shutil.copytree(signed, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    _rehash(broken, tiny_bundle)
    ota.sign(broken, keys[0])
    with pytest.raises(UpdateError, match="self-test failed"):
        ota.apply_update(prefix, broken, keys[1])  # staged into slot a, then refused
    assert _serving(prefix) == "b"
    load_bundle(prefix / "slots" / "a")  # still whole: what a rollback needs
    assert ota.rollback(prefix) == "a" and _serving(prefix) == "a"


def test_an_update_stopped_before_its_switch_gives_the_slot_back(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tiny_bundle: Path
) -> None:
    """The process died between staging (slot a holds the untested update, its old bundle set
    aside) and the switch: the next update puts the old bundle back first, so neither a refused
    update nor a rollback ends on the untested one."""
    assert ota.apply_update(prefix, signed, keys[1]).slot == "b"  # slot a: the first install
    before = ota.manifest_sha256(prefix / "slots" / "a")
    renamed = make_update(tiny_bundle, prefix.parent, keys[0], "untested", tar=False)
    staged = ota.stage_update(prefix, renamed, keys[1])  # ... and then the process dies
    assert staged.slot == "a" and ota.manifest_sha256(prefix / "slots" / "a") != before
    with pytest.raises(UpdateError):
        ota.stage_update(prefix, prefix.parent / "missing.tar", keys[1])
    assert ota.manifest_sha256(prefix / "slots" / "a") == before
    assert ota.rollback(prefix) == "a" and load_bundle(prefix / "bundle").name != "untested"


def test_cli_keygen_sign_update(tiny_bundle: Path, prefix: Path, tmp_path: Path) -> None:
    update = tmp_path / "cli-update"
    shutil.copytree(tiny_bundle, update)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_llm.cli", *args], capture_output=True, text=True)

    assert (
        cli("keygen", "--private", str(tmp_path / "k"), "--public", str(tmp_path / "k.pub")).returncode == 0
    )
    assert cli("sign", "--bundle", str(update), "--key", str(tmp_path / "k")).returncode == 0
    done = cli(
        "update", "--prefix", str(prefix), "--from", str(update), "--trusted-key", str(tmp_path / "k.pub")
    )
    assert done.returncode == 0, done.stderr
    assert "in slot b" in done.stdout
    (update / "tokenizer.json").write_text("{}")
    bad = cli(
        "update", "--prefix", str(prefix), "--from", str(update), "--trusted-key", str(tmp_path / "k.pub")
    )
    assert bad.returncode == 2 and "edge-llm: error:" in bad.stderr


def test_the_start_counter_rolls_back_after_n_starts_without_ready(
    prefix: Path, signed: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    state, link = tmp_path / "state.ota", prefix / "bundle"
    assert ota.apply_update(prefix, signed, keys[1], state_dir=state).slot == "b"
    assert ota.boot_check(state, link, 2) == "start 1 since the switch to slot b"
    ota.boot_ok(state)  # that start reached READY: the switch is confirmed
    assert ota.boot_check(state, link, 2) is None
    assert ota.apply_update(prefix, signed, keys[1], state_dir=state).slot == "a"
    assert ota.boot_check(state, link, 2) == "start 1 since the switch to slot a"
    assert ota.boot_check(state, link, 2) == "start 2 since the switch to slot a"
    done = ota.boot_check(state, link, 2)
    assert done == "rolled back to slot b: slot a failed to start 2 times"
    assert ota.Slots(prefix).active() == "b" and ota.boot_check(state, link, 2) is None
    last = ota.last_outcome(state)
    assert last is not None and last["outcome"] == "rolled_back" and last["slot"] == "b"


def test_updates_in_the_install_layout_write_only_under_prefix_ota(
    tiny_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    # install.sh: PREFIX/bundle → ota/bundle; the unit's one writable path under the prefix is
    # PREFIX/ota (ReadWritePaths), owned by the service user. Nothing else of PREFIX may change.
    root = tmp_path / "prefix"
    (root / "ota").mkdir(parents=True)
    shutil.copytree(tiny_bundle, root / "ota" / "bundle")
    (root / "bundle").symlink_to("ota/bundle")
    before = sorted(p.name for p in root.iterdir()), root.stat().st_mtime_ns
    first = ota.apply_update(root, make_update(tiny_bundle, tmp_path, keys[0]), keys[1])
    second = ota.apply_update(root, make_update(tiny_bundle, tmp_path, keys[0], "tiny-v3"), keys[1])
    assert (first.slot, second.slot) == ("b", "a")
    assert (sorted(p.name for p in root.iterdir()), root.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (root / "ota").iterdir()) == ["bundle", "slots"]
    assert (root / "bundle").readlink() == Path("ota/bundle") and ota.slot_of(root / "bundle") == "a"
    assert load_bundle(root / "bundle").name == "tiny-v3"
    assert ota.rollback(root) == "b" and load_bundle(root / "bundle").name == "tiny-v2"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_a_root_run_update_leaves_the_slots_to_the_service_user(
    tiny_bundle: Path, tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    # install.sh gives PREFIX/ota to the service user; `edge-llm update` run as root must not
    # leave root-owned slots there, or the service's next update over MQTT cannot stage.
    nobody = 65534
    root = tmp_path / "prefix"
    (root / "ota").mkdir(parents=True)
    shutil.copytree(tiny_bundle, root / "ota" / "bundle")
    (root / "bundle").symlink_to("ota/bundle")
    for p in [root / "ota", *(root / "ota").rglob("*")]:
        os.chown(p, nobody, nobody)
    ota.apply_update(root, make_update(tiny_bundle, tmp_path, keys[0]), keys[1])
    slots = root / "ota" / "slots"
    owners = {(p.relative_to(root).as_posix(), p.lstat().st_uid) for p in [slots, *slots.rglob("*")]}
    assert {uid for _, uid in owners} == {nobody}, sorted(o for o in owners if o[1] != nobody)
    assert (slots / "b" / "bundle.json").is_file()


def test_a_slots_folder_that_cannot_be_written_is_a_clear_refusal(
    prefix: Path, signed: Path, keys: tuple[Path, Path]
) -> None:
    (prefix / "slots").write_text("not a folder")  # stands for any OSError at staging
    with pytest.raises(UpdateError, match="cannot stage the update under"):
        ota.stage_update(prefix, signed, keys[1])
