"""A real Mosquitto broker for tests: own config, own folder, a free port on 127.0.0.1.

    broker = Broker(tmp_path, users={"dev": "pw"}, acl="...").start()
    ...  broker.port
    broker.restart()   # same port, same persistence folder: sessions and queued messages survive
    broker.stop()

Also `make_certs(folder)`: a throwaway CA, a server certificate for 127.0.0.1 and a client
certificate, made with the openssl CLI in well under a second (EC P-256).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=edge-llm test CA",
        "-days",
        "2",
    )
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "edge-llm-test-client")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return Certs(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


class Broker:
    def __init__(
        self,
        folder: Path,
        *,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        certs: Certs | None = None,
        require_client_cert: bool = False,
        persistence: bool = True,
        extra_config: str = "",  # more mosquitto.conf lines, e.g. "max_packet_size 2000"
        host: str = "127.0.0.1",  # where clients (and start()'s readiness check) reach it
        port: int | None = None,  # None: a free port on 127.0.0.1
        bind: str | None = None,  # listener address; None: `host`, "": every address
        wrap: tuple[str, ...] = (),  # command prefix, e.g. ("ip", "netns", "exec", NS)
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port if port is not None else free_port()
        self.bind = host if bind is None else bind
        self.wrap = wrap
        self.users = users
        self.acl = acl
        self.certs = certs
        self.require_client_cert = require_client_cert
        self.persistence = persistence
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "mosquitto.log"
        self.config = self._write_config()

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.bind}".rstrip(),
            f"user {getpass.getuser()}",  # as root, mosquitto would otherwise switch to "mosquitto"
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 10000",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
        ]
        if self.users is not None:
            pw = self.folder / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, capture_output=True
                )
            os.chmod(pw, 0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            acl = self.folder / "acl"
            acl.write_text(self.acl)
            os.chmod(acl, 0o600)
            lines.append(f"acl_file {acl}")
        if self.certs is not None:
            c = self.certs
            lines += [f"cafile {c.ca}", f"certfile {c.server_cert}", f"keyfile {c.server_key}"]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.extra_config:
            lines.append(self.extra_config)
        config = self.folder / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self, timeout: float = 10.0) -> Broker:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [*self.wrap, MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}): {err}\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}\n{self.log_text()}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (mosquitto saves its persistence file) or SIGKILL; wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
