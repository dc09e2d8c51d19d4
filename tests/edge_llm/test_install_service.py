"""install.sh with the service (not --no-service), without systemd: the service user may write the
A/B slots under PREFIX/ota and nothing else of the prefix, and takes a signed update there.

install.sh creates a system user and writes /etc and /var/lib; here it runs in a private mount
namespace over a copy of /etc and empty /var/lib and /var/log, so the host keeps its own. The update then
runs as that user (setpriv), as the unit's `User=edge-llm` would; ProtectSystem/ReadWritePaths
themselves need systemd (the unit's line: tests/edge_llm/test_systemd.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from edge_llm import ota, packverify
from edge_llm import pack as pack_mod

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (pytest runs in importlib mode)
from ota_helpers import make_update

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PY = Path("/usr/bin/python3.11")  # the service user cannot run an interpreter under /root

SCRIPT = r"""
set -eu
for d in etc var/lib var/log; do mount --bind "$W/$d" "/$d"; done
PYTHON=/usr/bin/python3.11 sh "$PKG/install.sh" --prefix "$PREFIX"
cp "$W/ota.pub" /etc/edge-llm/ota.pub && chmod 0644 /etc/edge-llm/ota.pub
U=$(id -u edge-llm); G=$(id -g edge-llm)
as_service() {
    setpriv --reuid="$U" --regid="$G" --clear-groups env HOME=/var/lib/edge-llm \
        EDGE_LLM_CACHE=/var/lib/edge-llm/cache ORT_DISABLE_TELEMETRY=1 "$@"
}
if as_service touch "$PREFIX/intruder" 2>/dev/null; then echo "WROTE PREFIX"; exit 3; fi
if as_service touch "$PREFIX/venv/intruder" 2>/dev/null; then echo "WROTE VENV"; exit 3; fi
cd /var/lib/edge-llm
# An operator's `edge-llm update` as root first: the slots it makes must stay the service's.
"$PREFIX/bin/edge-llm" update --prefix "$PREFIX" --from "$W/update.tar" \
    --trusted-key /etc/edge-llm/ota.pub --config /etc/edge-llm/board.toml
as_service "$PREFIX/bin/edge-llm" update --prefix "$PREFIX" --from "$W/update.tar" \
    --trusted-key /etc/edge-llm/ota.pub --config /etc/edge-llm/board.toml
echo "owner $(stat -c %U "$PREFIX/ota") link $(readlink "$PREFIX/ota/bundle")"
"""


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace, useradd inside it)"
    if not all(shutil.which(t) for t in ("unshare", "setpriv", "useradd", "mount")) or not SYSTEM_PY.exists():
        return "needs unshare, setpriv, useradd and /usr/bin/python3.11"
    if packverify.this_machine() not in pack_mod.ARCHES:
        return "packages are x86_64/aarch64"
    return None


@pytest.mark.slow  # packs (PyPI) and installs a venv: ~1-2 min on 2 shared cores
def test_the_service_user_updates_the_slots_under_prefix_ota_and_writes_nothing_else(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    why = _can_run()
    if why is not None:
        pytest.skip(why)
    board = tmp_path / "board.toml"
    board.write_text((ROOT / "configs/boards/cpu-2core.toml").read_text()
                     + "\n[ota]\ntrusted_key = '/etc/edge-llm/ota.pub'\n")  # fmt: skip
    try:
        result = pack_mod.pack(tiny_bundle, board, packverify.this_machine(), "3.11", tmp_path / "pkg")
    except Exception as exc:  # no PyPI here: nothing to install
        pytest.skip(f"pack could not resolve wheels: {exc}")
    assert any(w.name.startswith("cryptography-") for w in result.wheels)  # [ota] trusted_key
    work = Path(tempfile.mkdtemp(prefix="edge-llm-svc-", dir="/tmp"))
    try:
        work.chmod(0o755)  # the service user reads the update and the package from here
        shutil.copytree("/etc", work / "etc", symlinks=True)  # useradd edits passwd, group, shadow
        for d in ("var/lib", "var/log"):  # empty: install.sh makes /var/lib/edge-llm
            (work / d).mkdir(parents=True)
        ota.keygen(work / "ota.key", work / "ota.pub")
        update = make_update(tiny_bundle, tmp_path, work / "ota.key")
        shutil.copyfile(update, work / "update.tar")
        (work / "update.tar").chmod(0o644)
        pkg = work / "pkg"
        shutil.copytree(tmp_path / "pkg", pkg)
        prefix = work / "opt"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(W=str(work), PKG=str(pkg), PREFIX=str(prefix))
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "service enabled" in done.stdout or "systemd is not running" in done.stdout
        assert "active: tiny-v2" in done.stdout and "in slot b" in done.stdout  # root's
        assert "in slot a (was b)" in done.stdout  # the service user's, after root's
        assert "owner edge-llm link slots/a" in done.stdout, done.stdout
        assert not (prefix / "intruder").exists() and not (prefix / "venv" / "intruder").exists()
        assert (prefix / "bundle").readlink() == Path("ota/bundle")
        assert ota.Slots(prefix).active() == "a"
        assert (prefix / "ota" / "slots" / "b" / "bundle.json").is_file()  # the rollback slot
        unit = (work / "etc/systemd/system/edge-llm.service").read_text()
        assert f"ReadWritePaths={prefix}/ota" in unit
    finally:
        shutil.rmtree(work, ignore_errors=True)
