"""Board packages: target checks, manifest verification (fast), and pack → offline install → generate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm import pack as pack_mod
from edge_llm import packverify
from edge_llm.errors import PackError

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "configs" / "boards"
HERE_PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _fake_package(root: Path, arch: str | None = None, python: str = HERE_PY) -> Path:
    """A package-shaped folder without wheels: what verification looks at."""
    (root / "wheelhouse").mkdir(parents=True)
    (root / "wheelhouse" / "a-1.0-py3-none-any.whl").write_bytes(b"wheel bytes")
    (root / "bundle").mkdir()
    (root / "bundle" / "model.onnx.data").write_bytes(os.urandom(4096))
    (root / "install.sh").write_text("#!/bin/sh\n")
    shutil.copyfile(packverify.__file__, root / "verify.py")
    meta = {"arch": arch or packverify.this_machine(), "python": python}
    pack_mod.write_manifest(root, meta)
    return root


def test_a_complete_package_verifies(tmp_path: Path) -> None:
    manifest = packverify.verify(_fake_package(tmp_path / "pkg"))
    assert set(manifest["files"]) == {
        "wheelhouse/a-1.0-py3-none-any.whl",
        "bundle/model.onnx.data",
        "install.sh",
        "verify.py",
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "bundle" / "model.onnx.data").write_bytes(b"x" * 4096), "sha256 differs"),
        (lambda p: (p / "bundle" / "model.onnx.data").write_bytes(b"x" * 10), "bytes, the manifest says"),
        (lambda p: (p / "install.sh").unlink(), "install.sh: missing"),
        (lambda p: (p / "wheelhouse" / "evil-1.0-py3-none-any.whl").write_bytes(b"!"), "not in the manifest"),
        (lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_a_damaged_package_is_refused_naming_the_file(tmp_path: Path, damage, message: str) -> None:
    root = _fake_package(tmp_path / "pkg")
    damage(root)
    with pytest.raises(packverify.PackageError, match=message):
        packverify.verify(root)


def test_verify_script_runs_on_the_standard_library_alone(tmp_path: Path) -> None:
    root = _fake_package(tmp_path / "pkg")
    # -I: no PYTHONPATH, no site-packages of the user: what a bare board's python3 has.
    ok = subprocess.run(
        [sys.executable, "-I", str(root / "verify.py"), str(root)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 files match the manifest" in ok.stdout
    data = root / "bundle" / "model.onnx.data"
    data.write_bytes(bytes(reversed(data.read_bytes())))
    bad = subprocess.run(
        [sys.executable, "-I", str(root / "verify.py"), str(root)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "bundle/model.onnx.data: sha256 differs" in bad.stderr


def test_a_package_for_another_board_is_refused_unless_files_only(tmp_path: Path) -> None:
    other = "aarch64" if packverify.this_machine() != "aarch64" else "x86_64"
    root = _fake_package(tmp_path / "arch", arch=other)
    with pytest.raises(packverify.PackageError, match=f"this package is for {other}"):
        packverify.verify(root)
    assert packverify.verify(root, files_only=True)["arch"] == other
    root = _fake_package(tmp_path / "py", python="3.99")
    with pytest.raises(packverify.PackageError, match=r"wheels are for Python 3\.99"):
        packverify.verify(root)


@pytest.mark.parametrize(
    ("arch", "python", "message"),
    [
        ("armv7l", "3.11", "no 32-bit ARM wheels"),
        ("armhf", "3.11", "no 32-bit ARM wheels"),
        ("i686", "3.11", "no 32-bit x86"),
        ("riscv64", "3.11", "not supported"),
        ("aarch64", "3.9", "needs Python ≥ 3.10"),
        ("x86_64", "three", "expected 3.X"),
    ],
)
def test_unsupported_targets_are_refused_with_the_reason(arch: str, python: str, message: str) -> None:
    with pytest.raises(PackError, match=message):
        pack_mod.parse_target(arch, python)


def test_aliases_and_platform_tags() -> None:
    target = pack_mod.parse_target("arm64", "3.11")
    assert target.arch == "aarch64"
    # manylinux2014 alone resolves onnxruntime 1.16.3 on aarch64: 2_28 must be offered first.
    assert target.platforms[0] == "manylinux_2_28_aarch64"
    assert "manylinux2014_aarch64" in target.platforms
    assert target.abi == "cp311"


def test_the_onnxruntime_build_follows_the_board_providers() -> None:
    assert pack_mod.ort_package(BOARDS / "cpu-2core.toml") == "onnxruntime"
    assert pack_mod.ort_package(BOARDS / "intel-npu.toml") == "onnxruntime-openvino"
    assert pack_mod.ort_package(BOARDS / "jetson.toml") == "onnxruntime-gpu"
    assert pack_mod.ort_package(BOARDS / "qualcomm-npu.toml") == "onnxruntime-qnn"


def test_requirements_keep_floors_and_take_tokenizers_alone() -> None:
    with_deps, without = pack_mod.runtime_requirements("onnxruntime-openvino", need_jinja=False)
    assert any(r.startswith("onnxruntime-openvino>=") for r in with_deps)
    assert not any(r.startswith("onnxruntime>=") for r in with_deps)
    assert [r.split(">=")[0] for r in without] == ["tokenizers"]
    assert not any("jinja2" in r for r in with_deps)
    with_jinja, _ = pack_mod.runtime_requirements("onnxruntime", need_jinja=True)
    assert any(r.startswith("jinja2") for r in with_jinja)
    assert not any(r.startswith("cryptography") for r in with_deps + with_jinja)
    with_ota, _ = pack_mod.runtime_requirements("onnxruntime", need_jinja=False, need_ota=True)
    assert any(r.startswith("cryptography") for r in with_ota)  # a board that verifies signed updates


def test_bundle_files_are_world_readable(tiny_bundle: Path) -> None:
    # The export used to leave model.onnx.data 0600: a service user could not read it.
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_bundle.iterdir() if p.is_file()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


def test_pack_refuses_a_non_empty_out(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(PackError, match="exists and is not empty"):
        pack_mod.pack(tiny_bundle, BOARDS / "cpu-2core.toml", "x86_64", "3.11", out)
    assert (out / "keep").read_text() == "mine"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.slow  # ~80 s call on 2 shared cores: pip resolves, installs a venv, loads a model twice
@pytest.mark.skipif(packverify.this_machine() not in pack_mod.ARCHES, reason="packages are x86_64/aarch64")
def test_pack_then_install_offline_then_generate(tiny_bundle: Path, tmp_path: Path) -> None:
    if not _pypi_reachable():
        pytest.skip("pack resolves wheels from PyPI, which this machine cannot reach")
    out = tmp_path / "pkg"
    result = pack_mod.pack(
        tiny_bundle, BOARDS / "cpu-2core.toml", packverify.this_machine(), HERE_PY, out, tar=True
    )
    names = {w.name.split("-")[0].lower() for w in result.wheels}
    assert {"edge_llm", "onnxruntime", "numpy", "tokenizers", "paho_mqtt"} <= names
    assert not names & {"huggingface_hub", "hf_xet", "httpx", "torch", "transformers"}, names
    assert result.tarball is not None and result.tarball.stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == packverify.this_machine() and manifest["python"] == HERE_PY
    assert "wheels" in pack_mod.describe(result) or "runtime (" in pack_mod.describe(result)

    prefix = tmp_path / "prefix"
    # An install of the older layout (PREFIX/bundle -> slots/a, both slots in PREFIX): replaced,
    # and its slots removed, not left beside the new ota/ (up to two bundles of disk).
    for slot in ("a", "b"):
        shutil.copytree(tiny_bundle, prefix / "slots" / slot)
    (prefix / "bundle").symlink_to("slots/a")
    (prefix / ".bundle.switch").symlink_to("slots/b")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # the installed venv, not this checkout, must answer
    done = subprocess.run(
        ["sh", str(out / "install.sh"), "--prefix", str(prefix), "--no-service"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "no service installed" in done.stdout
    site = next(iter((prefix / "venv" / "lib").glob("python*/site-packages")))
    assert not (site / "pip").exists()  # slimmed
    for path in (prefix / "bundle").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    # The A/B area OTA writes (the unit's ReadWritePaths): PREFIX/bundle links into it.
    assert (prefix / "bundle").readlink() == Path("ota/bundle") and (prefix / "ota" / "bundle").is_dir()
    assert not (prefix / "slots").exists() and not (prefix / ".bundle.switch").is_symlink()
    gen = subprocess.run(
        [
            str(prefix / "bin" / "edge-llm"),
            "generate",
            "--bundle",
            str(prefix / "bundle"),
            "--max-tokens",
            "4",
            "--stats",
            "Hello",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stderr.strip().splitlines()[-1])["completion_tokens"] == 4

    # A tampered package installs nothing over the working one.
    (out / "bundle" / "tokenizer.json").write_text("{}")
    again = subprocess.run(
        ["sh", str(out / "install.sh"), "--prefix", str(prefix), "--no-service"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 1
    assert "bundle/tokenizer.json" in again.stderr and "nothing was installed" in again.stderr
    assert (prefix / "bin" / "edge-llm").exists()
