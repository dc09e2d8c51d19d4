"""Signed bundle updates on a board: ed25519 keys, detached signatures, A/B slots, rollback.

In: an update (a bundle folder, or a `.tar` of one, with `bundle.sig`), the board's trusted
public key and its install prefix. Out: the bundle unpacked into the inactive slot
(`PREFIX/slots/a|b`), checked, self-tested, and `PREFIX/bundle` (a symlink) switched to it in one
`rename`; or an `UpdateError` with the active bundle untouched.

What is signed: `bundle.json`'s bytes. It lists the size and sha256 of every bundle file, so one
signature covers the whole bundle; a file not listed there is refused at unpack. Order of checks:
unpack (safe paths, a truncated tar fails here) → signature → every file's size and hash
(`load_bundle`) → self-test (load with the board's providers, answer a probe prompt) → switch.
Nothing of the update is loaded before its signature has been checked.

The bundle must also suit this device (`platform_problem`): its target's execution provider
among those the board profile plans ("wrong architecture": a qnn-htp bundle on a CPU-only board)
and the onnxruntime it needs (its `requirements`). Checked after the hashes, before any load.

Keys and signatures need `cryptography` (extra `ota`); the runtime imports this module only for
`edge-llm keygen|sign|update` and for a server with `[ota] trusted_key`. `edge-llm update` swaps
the running server's bundle with `systemctl reload` (SIGHUP); an update over MQTT
(`edge_llm/ota_mqtt.py`) is staged here and swapped in by the running server itself.

Rollback after failed starts: a switch writes `ota-boot.json` into the service's state
directory (the slot switched to, the one before, a start count). Each start counts one
(`boot_check`, before the bundle loads); `READY` clears the file (`boot_ok`). When
`failed_starts` starts in a row did not reach READY, the next start switches back first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from edge_llm.bundle import MANIFEST, Bundle, load_bundle, requirements_problem
from edge_llm.errors import EdgeLLMError, UpdateError

SIGNATURE = "bundle.sig"
SLOTS = ("a", "b")
PROBE = "What is the capital of France?"
BOOT_FILE = "ota-boot.json"  # in the state directory: a switch not yet confirmed by a READY start
LAST_FILE = "ota-last.json"  # in the state directory: the last update's outcome (status topic)
APPLIED_FILE = "ota-applied.json"  # in the state directory: the update that installed the last switch
# The execution provider each export target's graph is built for (export/targets.py TARGETS).
TARGET_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn-htp": "QNNExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise UpdateError("signing and updates need `cryptography`: pip install 'edge-llm[ota]'") from None
    return serialization, ed25519


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def keygen(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair (private 0600, refusing to overwrite); return its key id."""
    serialization, ed25519 = _crypto()
    for path in (private_path, public_path):
        if path.exists():
            raise UpdateError(f"{path}: exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id(raw)


def _load_public(path: Path) -> Any:
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UpdateError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UpdateError(f"{path}: not an ed25519 public key")
    return key


def sign(bundle: Path, private_path: Path) -> Path:
    """Check the bundle's files against bundle.json, then write `bundle.sig` next to it."""
    serialization, ed25519 = _crypto()
    load_bundle(bundle)  # never sign a bundle whose files do not match its manifest
    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UpdateError(f"{private_path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UpdateError(f"{private_path}: not an ed25519 private key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = key.sign((bundle / MANIFEST).read_bytes())
    out = bundle / SIGNATURE
    sig = {"alg": "ed25519", "key_id": key_id(raw), "signature": base64.b64encode(signature).decode()}
    out.write_text(json.dumps(sig) + "\n")
    out.chmod(0o644)
    return out


def verify_signature(bundle: Path, public_path: Path) -> None:
    from cryptography.exceptions import InvalidSignature

    key = _load_public(public_path)
    try:
        sig = json.loads((bundle / SIGNATURE).read_text())
        signature = base64.b64decode(sig["signature"], validate=True)
    except FileNotFoundError:
        raise UpdateError(f"the update has no {SIGNATURE}: unsigned bundles are refused") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdateError(f"{SIGNATURE}: malformed ({exc})") from None
    try:
        key.verify(signature, (bundle / MANIFEST).read_bytes())
    except (InvalidSignature, FileNotFoundError):
        raise UpdateError(
            f"bad signature: bundle.json is not signed by the trusted key {public_path} (signed by key "
            f"{sig.get('key_id', '?')})"
        ) from None


def _unpack(source: Path, dest: Path) -> None:
    """Copy a bundle folder or extract a tar of one into `dest` (which must not exist)."""
    if source.is_dir():
        shutil.copytree(source, dest)
        return
    if not source.is_file():
        raise UpdateError(f"{source}: no such update (a bundle folder or a .tar of one)")
    dest.mkdir(parents=True)
    try:
        with tarfile.open(source) as tar:
            members = tar.getmembers()
            top = {PurePosixPath(m.name).parts[0] for m in members if m.name not in ("", ".")}
            strip = len(top) == 1 and not any(m.name == MANIFEST for m in members)  # a folder in the tar
            for m in members:
                parts = PurePosixPath(m.name).parts[1:] if strip else PurePosixPath(m.name).parts
                if not parts:
                    continue
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise UpdateError(f"{source}: unsafe member {m.name!r} (links, devices, absolute paths)")
                target = dest.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UpdateError(f"{source}: truncated or damaged archive ({exc})") from None


def _check_listed(bundle: Path) -> None:
    listed = set(json.loads((bundle / MANIFEST).read_text()).get("files", {})) | {MANIFEST, SIGNATURE}
    for path in bundle.rglob("*"):
        if path.is_file() and path.relative_to(bundle).as_posix() not in listed:
            raise UpdateError(f"{path.relative_to(bundle)}: not listed in bundle.json, so not signed")


def probe_engine(engine: Any, probe: str = PROBE, max_tokens: int = 8) -> str:
    """Answer `probe` with a loaded engine (exactly `max_tokens` tokens); return the answer."""
    from edge_llm.engine import Slot
    from edge_llm.sampling import SamplingParams

    try:
        ids = engine.encode_request(messages=[{"role": "user", "content": probe}])
        # ignore_eos: the graph must run max_tokens decode steps, not stop at a lucky EOS
        final = engine.complete(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), Slot())
    except EdgeLLMError as exc:
        raise UpdateError(f"self-test failed: {exc}") from None
    except Exception as exc:  # onnxruntime's own errors: a graph that does not run
        raise UpdateError(f"self-test failed: {type(exc).__name__}: {exc}") from None
    if final.usage is None or final.usage.completion_tokens != max_tokens:
        raise UpdateError(
            f"self-test failed: the probe prompt got {final.usage} instead of {max_tokens} tokens"
        )
    return str(final.text)


def load_for_test(bundle: Path, options: Any) -> Any:
    """The bundle's engine as the service would load it; UpdateError when it does not load."""
    from edge_llm.engine import Engine

    try:
        return Engine.load(bundle, options)
    except EdgeLLMError as exc:
        raise UpdateError(f"self-test failed: {exc}") from None
    except Exception as exc:  # onnxruntime's own errors: a graph that does not load
        raise UpdateError(f"self-test failed: {type(exc).__name__}: {exc}") from None


def self_test(bundle: Path, board: Path | None = None, probe: str = PROBE, max_tokens: int = 8) -> str:
    """Load the bundle as the service would and answer `probe`; return the answer."""
    from edge_llm.board import load_board

    engine = load_for_test(bundle, load_board(board).runner_options())
    return probe_engine(engine, probe, max_tokens)


def platform_problem(bundle: Bundle, options: Any = None) -> str | None:
    """Why this device cannot run `bundle` (wrong target / architecture, unmet requirements), or
    None. `options`: the board's RunnerOptions (its planned providers); None: CPU only."""
    import onnxruntime as ort

    from edge_llm.providers import plan_providers

    req = bundle.requirements
    target = req.target if req is not None else "cpu"
    needed = TARGET_PROVIDERS.get(target)
    if needed is None:
        return f"wrong architecture: the bundle's target {target!r} is not one this runtime knows"
    specs = options.providers if options is not None else ()
    planned = plan_providers(specs).providers
    if needed not in planned:
        return (
            f"wrong architecture: the bundle is built for target {target!r} ({needed}); this device"
            f" runs {', '.join(planned)}"
        )
    problem = requirements_problem(bundle, ort.__version__)
    return f"unmet requirements: {problem}" if problem is not None else None


@dataclass(frozen=True)
class UpdateResult:
    slot: str
    previous: str | None
    bundle: str
    sha256: str  # of bundle.json: names the exact bundle (it holds every file's hash)
    answer: str


AB_DIR = "ota"  # install.sh: PREFIX/bundle → ota/bundle, and PREFIX/ota is the service's to write


def ab_root(prefix: Path) -> Path:
    """The folder whose `bundle` entry an update switches: `PREFIX/ota` in an install.sh layout
    (the unit's one writable path under the prefix, `ReadWritePaths`), else `PREFIX` itself."""
    inner = prefix / AB_DIR
    return inner if os.path.lexists(inner / "bundle") else prefix


class Slots:
    """`ROOT/bundle` → `slots/<a|b>`, ROOT = `ab_root(prefix)`; a plain `ROOT/bundle` folder (the
    first install) is moved into slot a on the first update."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = ab_root(prefix)
        self.link = self.prefix / "bundle"
        self.root = self.prefix / "slots"

    def active(self) -> str | None:
        if self.link.is_symlink():
            name = Path(os.readlink(self.link)).name
            return name if name in SLOTS else None
        return None

    def adopt_plain_folder(self) -> None:
        if self.link.is_dir() and not self.link.is_symlink():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / "a", ignore_errors=True)
            self.link.rename(self.root / "a")
            self.switch("a")

    def inactive(self) -> str:
        return "b" if self.active() == "a" else "a"

    def switch(self, slot: str) -> None:
        """Point `PREFIX/bundle` at `slot` in one rename: a reader sees the old or the new."""
        tmp = self.prefix / ".bundle.switch"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(Path("slots") / slot)
        os.replace(tmp, self.link)


@dataclass(frozen=True)
class Staged:
    """An update unpacked into the inactive slot and checked (signature, files, platform), not
    yet self-tested or switched to."""

    slots: Slots
    slot: str
    previous: str | None
    path: Path
    bundle: Bundle
    sha256: str
    kept: Path | None = None  # what the inactive slot held before (put back if the update fails)


def manifest_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


def _own_like(path: Path, ref: Path, tree: bool = True) -> None:
    """As root, give `path` (with `tree`, all under it) to `ref`'s owner: a root-run `edge-llm
    update` on the install.sh layout (PREFIX/ota owned by the service user) must leave slots the
    service can still write, or its next update over MQTT cannot stage."""
    if os.geteuid() != 0:
        return
    st = ref.stat()
    for p in [path, *(path.rglob("*") if tree else ())]:
        os.chown(p, st.st_uid, st.st_gid, follow_symlinks=False)


def stage_update(prefix: Path, source: Path, trusted_key: Path, options: Any = None) -> Staged:
    """Unpack `source` beside the slots, check it, and only then move it into the inactive slot
    (what that slot held is kept aside until `commit` or `discard`): a refused update never
    costs the bundle a rollback would go back to."""
    try:
        return _stage_update(prefix, source, trusted_key, options)
    except OSError as exc:  # the slots not writable (owner, read-only, full): a clear refusal
        raise UpdateError(
            f"cannot stage the update under {ab_root(prefix)}: {exc.strerror or exc}"
            f"{f': {exc.filename}' if exc.filename else ''} (is that folder writable by this user?)"
        ) from None


def _stage_update(prefix: Path, source: Path, trusted_key: Path, options: Any) -> Staged:
    slots = Slots(prefix)
    slots.adopt_plain_folder()
    previous = slots.active()
    slot = slots.inactive()
    target, staging, kept = slots.root / slot, slots.root / ".staging", slots.root / ".kept"
    if kept.exists():  # an earlier update stopped before its switch: put the slot's old bundle
        shutil.rmtree(target, ignore_errors=True)  # back (commit removes .kept before switching)
        kept.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _own_like(slots.root, slots.prefix, tree=False)
    try:
        _unpack(source, staging)
        if not (staging / MANIFEST).is_file():
            raise UpdateError(f"{source}: no bundle.json at its top")
        verify_signature(staging, trusted_key)
        _check_listed(staging)
        try:
            # Sizes and hashes (tampered or truncated files), and a bundle for a newer runtime.
            bundle = load_bundle(staging)
        except EdgeLLMError as exc:
            raise UpdateError(f"the update does not load: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    moved = target.exists()
    if moved:
        target.rename(kept)
    staging.rename(target)  # the engine is loaded from where it will be served
    # The bundle as checked in staging, at its new place (bundle.json is read once).
    staged = Staged(slots, slot, previous, target, replace(bundle, path=target), manifest_sha256(target),
                    kept if moved else None)  # fmt: skip
    problem = platform_problem(staged.bundle, options)
    if problem is not None:
        discard(staged)
        raise UpdateError(problem)
    return staged


def discard(staged: Staged) -> None:
    """Remove a staged update and put back what its slot held."""
    shutil.rmtree(staged.path, ignore_errors=True)
    if staged.kept is not None and staged.kept.exists():
        staged.kept.rename(staged.path)


def commit(staged: Staged, state_dir: Path | None = None) -> None:
    """Switch `PREFIX/bundle` to the staged slot; with `state_dir`, count the starts from here."""
    for path in staged.path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    _own_like(staged.path, staged.slots.prefix)
    if state_dir is not None:
        _write_json(state_dir / BOOT_FILE, {"slot": staged.slot, "previous": staged.previous, "starts": 0})
    # .kept goes before the switch, so a .kept found later always means "not switched" (above).
    if staged.kept is not None:
        shutil.rmtree(staged.kept, ignore_errors=True)
    staged.slots.switch(staged.slot)


def apply_update(
    prefix: Path,
    source: Path,
    trusted_key: Path,
    board: Path | None = None,
    probe: str = PROBE,
    state_dir: Path | None = None,
) -> UpdateResult:
    from edge_llm.board import load_board

    options = load_board(board).runner_options()
    staged = stage_update(prefix, source, trusted_key, options)
    try:
        answer = probe_engine(load_for_test(staged.path, options), probe)
    except BaseException:
        discard(staged)
        raise
    commit(staged, state_dir)
    return UpdateResult(staged.slot, staged.previous, staged.bundle.name, staged.sha256, answer)


def rollback(prefix: Path) -> str:
    """Switch back to the other slot (it must hold a bundle that loads); return the slot."""
    slots = Slots(prefix)
    active = slots.active()
    if active is None:
        raise UpdateError(f"{prefix}/bundle is not a slot link: nothing to roll back to")
    other = slots.inactive()
    try:
        load_bundle(slots.root / other)
    except EdgeLLMError as exc:
        raise UpdateError(f"slot {other} holds no usable bundle: {exc}") from None
    slots.switch(other)
    return other


# -- rollback after failed starts (state directory) --


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write in one rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def record_outcome(state_dir: Path, outcome: dict[str, Any], applied: bool = False) -> dict[str, Any]:
    """Remember the last update's outcome (shown on the status topic); return it, timestamped.
    `applied`: also as the update switched to (kept when later updates are refused)."""
    doc = {**outcome, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(state_dir / LAST_FILE, doc)
    if applied:
        _write_json(state_dir / APPLIED_FILE, doc)
    return doc


def last_outcome(state_dir: Path) -> dict[str, Any] | None:
    return _read_json(state_dir / LAST_FILE)


def last_applied(state_dir: Path) -> dict[str, Any] | None:
    return _read_json(state_dir / APPLIED_FILE)


def slot_of(bundle_path: Path) -> str | None:
    """The A/B slot a bundle path serves from (through the `PREFIX/bundle` link), or None."""
    real = Path(os.path.realpath(bundle_path))
    return real.name if real.parent.name == "slots" and real.name in SLOTS else None


def boot_check(state_dir: Path, bundle_path: Path, max_failed: int) -> str | None:
    """Count this start after a switch; after `max_failed` starts that never reached READY,
    switch `bundle_path`'s link back to the previous slot first. Returns what was done (a line
    for the log) or None when no switch is pending."""
    marker = _read_json(state_dir / BOOT_FILE)
    if marker is None:
        return None
    starts = int(marker.get("starts", 0))
    previous = marker.get("previous")
    if starts < max_failed or max_failed <= 0:
        _write_json(state_dir / BOOT_FILE, {**marker, "starts": starts + 1})
        return f"start {starts + 1} since the switch to slot {marker.get('slot')}"
    (state_dir / BOOT_FILE).unlink(missing_ok=True)
    slots = Slots(Path(bundle_path).parent)
    if previous not in SLOTS or slots.active() != marker.get("slot"):
        return f"{starts} failed starts, but {bundle_path} no longer points at slot {marker.get('slot')}"
    if not (slots.root / previous / MANIFEST).is_file():
        return f"{starts} failed starts, but slot {previous} holds no bundle to roll back to"
    slots.switch(previous)
    record_outcome(
        state_dir,
        {"outcome": "rolled_back", "slot": previous, "error": f"slot {marker.get('slot')} failed to"
         f" start {starts} times in a row; rolled back to slot {previous}"},
    )  # fmt: skip
    return f"rolled back to slot {previous}: slot {marker.get('slot')} failed to start {starts} times"


def boot_ok(state_dir: Path) -> None:
    """The service came up (READY): the switch is confirmed, stop counting."""
    (state_dir / BOOT_FILE).unlink(missing_ok=True)
