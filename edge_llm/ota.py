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

Keys and signatures need `cryptography` (extra `ota`); the runtime imports this module only for
`edge-llm keygen|sign|update`. A running `edge-llm serve` picks the new bundle up when it is
restarted (`systemctl restart edge-llm`: queued requests are answered `busy`, which clients
retry; the running one finishes within the grace period).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edge_llm.bundle import MANIFEST, load_bundle
from edge_llm.errors import EdgeLLMError, UpdateError

SIGNATURE = "bundle.sig"
SLOTS = ("a", "b")
PROBE = "What is the capital of France?"


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


def self_test(bundle: Path, board: Path | None = None, probe: str = PROBE, max_tokens: int = 8) -> str:
    """Load the bundle as the service would and answer `probe`; return the answer."""
    from edge_llm.board import load_board
    from edge_llm.engine import Engine, Slot
    from edge_llm.sampling import SamplingParams

    try:
        engine = Engine.load(bundle, load_board(board).runner_options())
        ids = engine.encode_request(messages=[{"role": "user", "content": probe}])
        # ignore_eos: the graph must run max_tokens decode steps, not stop at a lucky EOS
        final = engine.complete(ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), Slot())
    except EdgeLLMError as exc:
        raise UpdateError(f"self-test failed: {exc}") from None
    except Exception as exc:  # onnxruntime's own errors: a graph that does not load or run
        raise UpdateError(f"self-test failed: {type(exc).__name__}: {exc}") from None
    if final.usage is None or final.usage.completion_tokens != max_tokens:
        raise UpdateError(
            f"self-test failed: the probe prompt got {final.usage} instead of {max_tokens} tokens"
        )
    return final.text


@dataclass(frozen=True)
class UpdateResult:
    slot: str
    previous: str | None
    bundle: str
    sha256: str  # of bundle.json: names the exact bundle (it holds every file's hash)
    answer: str


class Slots:
    """`PREFIX/bundle` → `slots/<a|b>`; a plain `PREFIX/bundle` folder (the first install) is moved
    into slot a on the first update."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.link = prefix / "bundle"
        self.root = prefix / "slots"

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


def apply_update(
    prefix: Path, source: Path, trusted_key: Path, board: Path | None = None, probe: str = PROBE
) -> UpdateResult:
    slots = Slots(prefix)
    slots.adopt_plain_folder()
    previous = slots.active()
    slot = slots.inactive()
    stage = slots.root / slot
    shutil.rmtree(stage, ignore_errors=True)  # the inactive slot holds nothing we serve
    stage.parent.mkdir(parents=True, exist_ok=True)
    try:
        _unpack(source, stage)
        if not (stage / MANIFEST).is_file():
            raise UpdateError(f"{source}: no bundle.json at its top")
        verify_signature(stage, trusted_key)
        _check_listed(stage)
        try:
            # Sizes and hashes (tampered or truncated files), and a bundle for a newer runtime.
            bundle = load_bundle(stage)
        except EdgeLLMError as exc:
            raise UpdateError(f"the update does not load: {exc}") from None
        answer = self_test(stage, board, probe)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for path in stage.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    slots.switch(slot)
    digest = hashlib.sha256((stage / MANIFEST).read_bytes()).hexdigest()
    return UpdateResult(slot, previous, bundle.name, digest, answer)


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
