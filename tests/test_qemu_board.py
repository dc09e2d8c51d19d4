"""boards/qemu-aarch64.sh without root or qemu: it parses, its binfmt_misc registration matches
aarch64 ELF files (and only those), and its results writer turns the guest's markers into
benchmarks/results/qemu_aarch64.{json,md}. The script itself runs for an hour under emulation and
needs root: docs/boards.md section 6."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "boards" / "qemu-aarch64.sh"


def test_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(SCRIPT)], check=True)


def _unescape(field: str) -> bytes:
    # binfmt_misc decodes \xNN itself; the script writes the escapes as text
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), field.encode())


def _elf_header(machine: int, e_type: int) -> bytes:
    # e_ident (64-bit, little-endian, version 1, SysV ABI, padding), e_type, e_machine
    ident = b"\x7fELF\x02\x01\x01\x00" + bytes(8)
    return ident + e_type.to_bytes(2, "little") + machine.to_bytes(2, "little")


def test_binfmt_registration_matches_aarch64_elf_only() -> None:
    text = SCRIPT.read_text()
    fields = re.search(r"printf ':qemu-aarch64:M::%s:%s:%s:F\\n' \\\n\s*'([^']*)' \\\n\s*'([^']*)'", text)
    assert fields, "the binfmt_misc registration line is not where the test expects it"
    magic, mask = _unescape(fields.group(1)), _unescape(fields.group(2))
    assert len(magic) == len(mask) == 20

    def matches(header: bytes) -> bool:
        return all((h & k) == (m & k) for h, m, k in zip(header, magic, mask, strict=True))

    aarch64, x86_64 = 0xB7, 0x3E
    assert matches(_elf_header(aarch64, 2))  # executable
    assert matches(_elf_header(aarch64, 3))  # PIE / shared object (most of Debian's binaries)
    assert not matches(_elf_header(x86_64, 3))  # the host's own binaries stay native
    assert not matches(_elf_header(aarch64, 1))  # relocatable objects are not run


def _results_writer() -> str:
    text = SCRIPT.read_text()
    found = re.search(r"^\"\$PY\" - <<'EOF'\n(.*?)^EOF$", text, re.M | re.S)
    assert found, "the script's results writer is not where the test expects it"
    return found.group(1)


def test_results_writer(tmp_path: Path) -> None:
    if shutil.which("qemu-system-aarch64") is None:
        pytest.skip("qemu-system-aarch64 not installed (the writer records its version)")
    (tmp_path / "phases.txt").write_text(
        "debootstrap cached:41.1\nsecond_stage cached:900.5\nimage cached:20.0\n"
        "pack 19.2\npackage_disk 4.0\nboot 120.0\ninstall 600.0\nservice_start 300.0\nfirst_answer 40.0\n"
    )
    wheels = ["numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl", "edge_llm-0-py3-none-any.whl"]
    (tmp_path / "wheels.txt").write_text("\n".join(wheels) + "\n")
    usage = {
        "prompt_tokens": 31,
        "completion_tokens": 8,
        "cached_tokens": 0,
        "ttft_s": 20.5,
        "prefill_s": 20.0,
        "decode_s": 14.0,
        "decode_tok_s": 0.5,
        "finish_reason": "length",
    }
    env = {
        **os.environ,
        "PHASES": str(tmp_path / "phases.txt"),
        "RUN": str(tmp_path),
        "RESULTS": str(tmp_path / "out" / "qemu_aarch64"),
        "QUESTION": "What is the capital of France?",
        "ANSWER": "The capital of France is Paris.",
        "STATS": json.dumps(usage),
        "BOOTED": "EDGE-QEMU booted uptime=95.2 arch=aarch64 python=3.11.2",
        "SIZE": "EDGE-QEMU size venv=150000000 bundle=170000000 prefix=320000000",
        "VERIFY": "EDGE-QEMU verify rc=0 lines=0",
        "SERVICE": "EDGE-QEMU service_start rc=0 seconds=300.0 active=active",
        "RELOAD": "EDGE-QEMU reload rc=0 active=active",
        "STAGE2_IN": "chroot (qemu-user via binfmt_misc)",
        "CPU": "cortex-a72",
        "SMP": "2",
        "MEM": "3072",
        "MAX_TOKENS": "8",
    }
    subprocess.run([sys.executable, "-c", _results_writer()], env=env, check=True, capture_output=True)
    doc = json.loads((tmp_path / "out" / "qemu_aarch64.json").read_text())
    assert doc["phases_s"]["second_stage"] == 900.5
    assert doc["phases_from_cache_build"] == ["debootstrap", "second_stage", "image"]
    assert doc["guest"] == {"uptime": "95.2", "arch": "aarch64", "python": "3.11.2"}
    assert doc["installed_bytes"]["venv"] == 150000000
    assert doc["reload"] == {"rc": "0", "active": "active"}
    assert doc["second_stage_in"] == "chroot (qemu-user via binfmt_misc)"
    assert doc["wheels"] == wheels
    assert doc["emulated_decode_tok_s"] == 0.5
    assert doc["emulated_e2e_tok_s"] == 0.2  # 8 tokens in the 40 s of first_answer
    md = (tmp_path / "out" / "qemu_aarch64.md").read_text()
    assert "| second_stage | 900.5 (when the cache was built) |" in md
    assert "'The capital of France is Paris.'" in md


def test_cleanup_goes_on_when_unmounting_fails(tmp_path: Path) -> None:
    # unmount_rootfs ends in `die` (exit 1) when something stays mounted; run in the EXIT trap,
    # that exit would skip the rest of cleanup: the binfmt entry and the run's disk images.
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    found = re.search(r"^cleanup\(\) \{\n.*?^\}$", SCRIPT.read_text(), re.M | re.S)
    assert found, "the script's cleanup is not where the test expects it"
    run = tmp_path / "run"
    (run / "disk").mkdir(parents=True)
    (run / "pkg.img").write_text("image")
    program = "\n".join([
        "set -euo pipefail",
        'die() { echo "error: $*" >&2; exit 1; }',
        'unmount_rootfs() { die "still mounted under /x"; }',
        'QEMU_PID=""; BROKER_PID=""; BINFMT_REGISTERED=""; RUN="$1"',
        found.group(0),
        "trap cleanup EXIT",
    ])  # fmt: skip
    done = subprocess.run([bash, "-c", program, "sh", str(run)], capture_output=True, text=True)
    assert "still mounted" in done.stderr
    assert f"logs: {run}" in done.stdout, done.stdout + done.stderr
    assert not (run / "disk").exists() and not (run / "pkg.img").exists()
