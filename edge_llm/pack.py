"""`edge-llm pack`: a self-contained board package, built on the workstation, installed offline.

In: a bundle folder, a board profile, a target (`x86_64` | `aarch64`, Python `3.X`) and this
source checkout. Out: a folder (and optionally a `.tar` of it) holding

    install.sh            offline installer (configs/package/install.sh)
    verify.py             manifest check, standard library only (edge_llm/packverify.py)
    manifest.json         target, versions, sizes and the sha256 of every other file
    wheelhouse/*.whl      edge-llm (built from this checkout) + the runtime's wheels for the target
    bundle/               the bundle, files 0644
    board.toml            the board profile
    edge-llm.service      the systemd unit (configs/systemd/edge-llm.service)
    docs/boards.md

The wheelhouse is resolved by `pip download --only-binary=:all:` for the target's manylinux
platforms, so nothing is compiled and nothing is fetched on the board. Only the runtime's
dependencies go in, with the ONNX Runtime build the board's providers need; `tokenizers` goes in
without its dependencies (huggingface_hub, hf-xet, httpx, ... are used only by
`Tokenizer.from_pretrained`, which the runtime never calls; the tokenizer comes from the bundle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_llm import __version__, packverify
from edge_llm.board import load_board
from edge_llm.bundle import MANIFEST as BUNDLE_MANIFEST
from edge_llm.bundle import load_bundle
from edge_llm.errors import PackError

ARCHES = ("x86_64", "aarch64")
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
# Refused up front, with the reason, rather than after a confusing pip failure.
_REFUSED = {
    arch: "onnxruntime and numpy publish no 32-bit ARM wheels: run a 64-bit OS (aarch64) on the board"
    for arch in ("armv7", "armv7l", "armhf", "armv6l", "arm")
} | {arch: "onnxruntime publishes no 32-bit x86 Linux wheels" for arch in ("i386", "i686", "x86")}
MIN_PYTHON = (3, 10)  # pyproject's requires-python
# glibc 2.28 (Debian 10, Ubuntu 20.04, Jetson L4T 32+) first: onnxruntime's current aarch64
# wheels are manylinux_2_28 only; manylinux2014 alone resolves onnxruntime 1.16.3 there.
_GLIBC = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")
# board provider -> the onnxruntime distribution that carries it (CPU is in every one)
ORT_PACKAGES = {
    "cpu": "onnxruntime",
    "cuda": "onnxruntime-gpu",
    "tensorrt": "onnxruntime-gpu",
    "openvino": "onnxruntime-openvino",
    "qnn": "onnxruntime-qnn",
}
# Dependencies installed without their own dependencies: what those pull in is never imported.
NO_DEPS = ("tokenizers",)
CHECKOUT_PARTS = ("pyproject.toml", "README.md", "edge_llm", "export")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    arch: str
    python: str  # "3.11"

    @property
    def platforms(self) -> list[str]:
        return [f"{glibc}_{self.arch}" for glibc in _GLIBC]

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


@dataclass
class WheelInfo:
    name: str
    download_bytes: int
    installed_bytes: int  # the sum of the wheel's files, uncompressed (before .pyc)


@dataclass
class PackResult:
    out: Path
    target: Target
    wheels: list[WheelInfo] = field(default_factory=list)
    bundle_bytes: int = 0
    tarball: Path | None = None

    @property
    def runtime_installed_bytes(self) -> int:
        return sum(w.installed_bytes for w in self.wheels)


def parse_target(arch: str, python: str) -> Target:
    arch = _ALIASES.get(arch.lower(), arch.lower())
    if arch in _REFUSED:
        raise PackError(f"--arch {arch}: not supported: {_REFUSED[arch]}")
    if arch not in ARCHES:
        raise PackError(f"--arch {arch}: not supported (choose one of {', '.join(ARCHES)})")
    m = re.fullmatch(r"3\.(\d+)", python)
    if m is None:
        raise PackError(f"--python {python}: expected 3.X, e.g. 3.11")
    if (3, int(m.group(1))) < MIN_PYTHON:
        raise PackError(f"--python {python}: edge-llm needs Python ≥ {'.'.join(map(str, MIN_PYTHON))}")
    return Target(arch, python)


def ort_package(board_path: Path) -> str:
    """The onnxruntime distribution for the board's providers (one that is not CPU at most)."""
    names = {spec.name for spec in load_board(board_path).provider_specs()}
    packages = {ORT_PACKAGES[n] for n in names if n in ORT_PACKAGES and n != "cpu"}
    missing = sorted(n for n in names if n not in ORT_PACKAGES)
    if missing:
        raise PackError(f"{board_path}: no Linux onnxruntime build is known for providers {missing}")
    if len(packages) > 1:
        raise PackError(f"{board_path}: providers need different onnxruntime builds {sorted(packages)}")
    return packages.pop() if packages else "onnxruntime"


def runtime_requirements(ort: str, need_jinja: bool, need_ota: bool = False) -> tuple[list[str], list[str]]:
    """(resolved with dependencies, taken without) from pyproject's runtime dependencies, keeping
    their version floors; onnxruntime is swapped for `ort` with the same floor. `need_ota`: the
    board takes signed updates ([ota] trusted_key), which are verified with the `ota` extra."""
    pyproject = load_pyproject()
    deps: list[str] = list(pyproject["project"]["dependencies"])
    extras = pyproject["project"]["optional-dependencies"]
    if need_jinja:
        deps += extras["templates"]
    if need_ota:
        deps += extras["ota"]
    with_deps, without = [], []
    for req in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", req)
        assert name is not None, req
        base = name.group(0).lower()
        if base == "onnxruntime":
            req = ort + req[len(name.group(0)) :]
        (without if base in NO_DEPS else with_deps).append(req)
    return with_deps, without


def load_pyproject() -> dict[str, Any]:
    path = ROOT / "pyproject.toml"
    if not path.is_file():
        raise PackError(f"pack builds the edge-llm wheel from a source checkout; {path} is missing")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise PackError(f"{what} failed:\n{tail}")


def build_wheel(dest: Path) -> None:
    """The edge-llm wheel from this checkout (a clean copy, so the tree gets no build/ folder)."""
    with tempfile.TemporaryDirectory(prefix="edge-llm-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for part in CHECKOUT_PARTS:
            path = ROOT / part
            if path.is_dir():
                shutil.copytree(path, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, src / part)
        _pip(
            ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)],
            "building the wheel",
        )


def download_wheels(target: Target, dest: Path, with_deps: list[str], without: list[str]) -> None:
    common = ["download", "-q", "--only-binary=:all:", "--python-version", target.python]
    common += [
        "--implementation",
        "cp",
        "--abi",
        target.abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-d",
        str(dest),
    ]
    for platform in target.platforms:
        common += ["--platform", platform]
    where = f"Python {target.python} on {target.arch} (glibc ≥ 2.17)"
    _pip([*common, *with_deps], f"resolving wheels of {', '.join(with_deps)} for {where}")
    if without:
        _pip([*common, "--no-deps", *without], f"resolving wheels of {', '.join(without)} for {where}")


def check_wheel_tags(wheelhouse: Path, target: Target) -> None:
    """Every wheel is pure Python or built for the target architecture."""
    for wheel in wheelhouse.glob("*.whl"):
        platform_tags = wheel.stem.split("-")[-1].split(".")
        if not all(t == "any" or t.endswith("_" + target.arch) for t in platform_tags):
            raise PackError(f"{wheel.name}: not a {target.arch} or pure-Python wheel")


def wheel_sizes(wheelhouse: Path) -> list[WheelInfo]:
    out = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            installed = sum(info.file_size for info in z.infolist())
        out.append(WheelInfo(wheel.name, wheel.stat().st_size, installed))
    return out


def copy_bundle(src: Path, dest: Path) -> int:
    """Copy the files the bundle's manifest lists (after checking their sha256), 0644."""
    bundle = load_bundle(src)
    dest.mkdir()
    total = 0
    for name in [BUNDLE_MANIFEST, *bundle.files]:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)
        target.chmod(0o644)  # read by the service user, whoever built the bundle
        total += target.stat().st_size
    return total


def write_manifest(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != packverify.MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": packverify.sha256_file(path)}
    manifest = {"format": packverify.FORMAT, **meta, "files": files}
    (root / packverify.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def pack(bundle: Path, board: Path, arch: str, python: str, out: Path, tar: bool = False) -> PackResult:
    target = parse_target(arch, python)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"{out}: exists and is not empty; choose a new --out")
    ort = ort_package(board)  # loads the profile: unknown keys etc. fail before any download
    need_jinja = load_bundle(bundle, verify=False).tokenizer.chat_format is None
    with_deps, without = runtime_requirements(ort, need_jinja, bool(load_board(board).ota.trusted_key))
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        result = PackResult(out, target)
        result.bundle_bytes = copy_bundle(bundle, partial / "bundle")
        wheelhouse = partial / "wheelhouse"
        wheelhouse.mkdir()
        build_wheel(wheelhouse)
        download_wheels(target, wheelhouse, with_deps, without)
        check_wheel_tags(wheelhouse, target)
        result.wheels = wheel_sizes(wheelhouse)
        shutil.copyfile(board, partial / "board.toml")
        shutil.copyfile(ROOT / "configs" / "systemd" / "edge-llm.service", partial / "edge-llm.service")
        shutil.copyfile(ROOT / "configs" / "package" / "install.sh", partial / "install.sh")
        (partial / "install.sh").chmod(0o755)
        shutil.copyfile(packverify.__file__, partial / "verify.py")
        (partial / "docs").mkdir()
        shutil.copyfile(ROOT / "docs" / "boards.md", partial / "docs" / "boards.md")
        write_manifest(
            partial,
            {
                "edge_llm": __version__,
                "arch": target.arch,
                "python": target.python,
                "board": load_board(board).name,
                "bundle": load_bundle(bundle, verify=False).name,
                "onnxruntime": ort,
                "requirements": with_deps + without,
                "installed_bytes": result.runtime_installed_bytes,
            },
        )
        packverify.verify(partial, files_only=True)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if tar:
        result.tarball = out.with_name(out.name + ".tar")
        with tarfile.open(result.tarball, "w") as t:
            t.add(out, arcname=out.name)
    return result


def describe(result: PackResult) -> str:
    mb = 1e6
    lines = [f"{'wheel':<72} {'download':>9} {'installed':>10}"]
    for w in result.wheels:
        lines.append(f"{w.name:<72} {w.download_bytes / mb:>7.1f}MB {w.installed_bytes / mb:>8.1f}MB")
    down = sum(w.download_bytes for w in result.wheels)
    lines.append(
        f"{'runtime (' + str(len(result.wheels)) + ' wheels)':<72} {down / mb:>7.1f}MB "
        f"{result.runtime_installed_bytes / mb:>8.1f}MB"
    )
    lines.append(f"{'bundle':<72} {'':>9} {result.bundle_bytes / mb:>8.1f}MB")
    lines.append(
        f"installed size is the wheels' files uncompressed (no .pyc, no venv's pip); "
        f"package for {result.target.arch}, Python {result.target.python}: {result.out}"
    )
    if result.tarball is not None:
        lines.append(f"tarball: {result.tarball} ({os.path.getsize(result.tarball) / mb:.1f} MB)")
    return "\n".join(lines)
