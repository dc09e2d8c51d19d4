"""Network namespaces, links, delay/jitter/loss and CPU limits for `benchmarks/fleet.py` (root).

One run's layout (every name carries the orchestrator's pid, so a run that died without cleaning
up is recognised and removed by the next one, `clean_stale`):

    root ns  efl<pid>c 10.214.K.1/30 ──veth── up0 10.214.K.2/30   efl<pid>-brk (the broker's ns)
    efl<pid>-b<i>  eth0 10.213.<i>.2/30 ──link── b<i> 10.213.<i>.1/30   (one link per board)

The clients (the benchmark process) reach the broker over the first link, unshaped: they stand for
an application next to the broker. Each board link is shaped both ways (delay, jitter, loss) by
one of two shapers:

- `netem`: the link is a veth pair with `tc netem` on both ends (netem shapes egress only). Used
  when the kernel has sch_netem.
- `tun`: the link is two TUN devices, one in each namespace, joined by a small userspace wire
  (`python -m benchmarks.netns wire`, this file) that reads each IP packet, drops it with the
  loss probability, and writes it to the other side after delay ± jitter (uniform; packets of
  one direction keep their order). For kernels built without netem, such as this project's VM
  (CONFIG_NET_SCH_NETEM is not set: `tc qdisc add ... netem` answers "Specified qdisc kind is
  unknown"). The wire ends when its stdin closes, i.e. with the orchestrator.

"A link drops": `netem`: `ip link set b<i> down` on the broker's side (the cable pulled at the
switch); `tun`: the wire drops every packet of that link (netem's loss 100%). Either way the
board's own interface keeps its address and route, and TCP retransmits until the link is back.

CPU: each board process goes into its own cgroup (v1 `cpu` controller: `cpu.cfs_quota_us`, or
v2 `cpu.max`) limited to a fraction of one core; where neither can be written, `taskset` + `nice`
(pinned to one core, lower priority: a weaker limit, and reported as such).

Everything made here is undone by `Net.cleanup()`: processes still inside our namespaces are
killed (they are ours: only we start processes there), the wire stopped, namespaces deleted
(that deletes their links), cgroups removed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import ipaddress
import os
import random
import re
import selectors
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "efl"  # namespaces efl<pid>-..., root-side interface efl<pid>c, cgroups efl<pid>
BOARD_NET = "10.213"  # link i: 10.213.<i>.0/30
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


class NetError(RuntimeError):
    """A namespace, link or qdisc could not be made (not root, no iproute2, no netem...)."""


def ip(*args: str, check: bool = True) -> str:
    return _run(["ip", *args], check)


def _run(cmd: list[str], check: bool = True) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise NetError(f"{cmd[0]} not found ({exc})") from None
    if check and done.returncode != 0:
        raise NetError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def netns_works() -> str | None:
    """None when this process can create network namespaces and veth pairs, else why not."""
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        return None
    except NetError as exc:
        return str(exc)
    finally:
        ip("netns", "delete", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Remove the namespaces and cgroups of earlier runs whose orchestrator is dead (a SIGKILLed
    run cannot clean up after itself). Returns what was removed."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            _kill_inside(name)
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for root in (CGROUP_V1, CGROUP_V2):
        for d in root.glob(f"{PREFIX}[0-9]*") if root.is_dir() else []:
            m = re.fullmatch(rf"{PREFIX}(\d+)", d.name)
            if m and not _alive(int(m.group(1))):
                _rm_cgroup(d)
                removed.append(str(d))
    return removed


def _kill_inside(ns: str) -> None:
    """SIGKILL every process left in one of OUR namespaces (boards, the broker: we started them)."""
    for pid in ip("netns", "pids", ns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _rm_cgroup(d: Path) -> None:
    for _ in range(50):  # a killed process leaves its cgroup a moment later
        for child in sorted(d.glob("*/"), reverse=True):
            if (child / "cgroup.procs").exists():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()
        if not d.exists():
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class Netem:
    delay_ms: float = 20.0
    jitter_ms: float = 10.0
    loss_pct: float = 1.0

    def args(self) -> list[str]:
        # Uniform jitter: Debian's iproute2 here ships no distribution tables (`normal` fails).
        out = ["delay", f"{self.delay_ms}ms"]
        if self.jitter_ms > 0:
            out.append(f"{self.jitter_ms}ms")
        if self.loss_pct > 0:
            out += ["loss", f"{self.loss_pct}%"]
        return out

    def describe(self) -> str:
        return f"delay {self.delay_ms:g} ms ± {self.jitter_ms:g} ms, loss {self.loss_pct:g}% (each way)"


class CpuLimit:
    """Per-board CPU limit: a cgroup with a quota (preferred) or taskset + nice (fallback)."""

    def __init__(self, tag: str, cores: float, fallback_nice: int = 10) -> None:
        self.tag, self.cores, self.nice = tag, cores, fallback_nice
        self.root: Path | None = None
        self.mode = "none" if cores <= 0 else self._pick()

    def _pick(self) -> str:
        period = 100_000
        quota = str(int(self.cores * period))
        v1 = CGROUP_V1 / self.tag
        with contextlib.suppress(OSError):
            v1.mkdir()
            (v1 / "probe").mkdir()
            (v1 / "probe" / "cpu.cfs_quota_us").write_text(quota)
            (v1 / "probe").rmdir()
            self.root = v1
            return "cgroup-v1"
        _rm_cgroup(v1)
        v2 = CGROUP_V2 / self.tag
        with contextlib.suppress(OSError):
            if "cpu" in (CGROUP_V2 / "cgroup.controllers").read_text().split():
                v2.mkdir()
                (v2 / "cgroup.subtree_control").write_text("+cpu")
                (v2 / "probe").mkdir()
                (v2 / "probe" / "cpu.max").write_text(f"{quota} {period}")
                (v2 / "probe").rmdir()
                self.root = v2
                return "cgroup-v2"
        _rm_cgroup(v2)
        return "taskset+nice"

    def describe(self) -> str:
        if self.mode == "none":
            return "no CPU limit"
        if self.mode.startswith("cgroup"):
            return f"{self.mode} CPU quota {self.cores:g} core per board"
        return f"taskset (one core each, round robin) + nice {self.nice}: no quota (no writable cgroup)"

    def command_prefix(self, index: int) -> list[str]:
        """The fallback's limit, as a command prefix: pinned to one core (round robin), reniced."""
        if self.mode != "taskset+nice":
            return []
        cpus = sorted(os.sched_getaffinity(0))
        return ["taskset", "-c", str(cpus[index % len(cpus)]), "nice", "-n", str(self.nice)]

    def attach(self, index: int, pid: int) -> None:
        """Move a just-started board process into its cgroup (its threads, made later, follow).
        Done from the parent rather than in a preexec_fn, which is unsafe in a threaded parent."""
        if self.root is None:
            return
        group = self.root / f"b{index}"
        group.mkdir(exist_ok=True)
        quota = int(self.cores * 100_000)
        if self.mode == "cgroup-v1":
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} 100000")
        (group / "cgroup.procs").write_text(str(pid))
        if str(pid) not in (group / "cgroup.procs").read_text().split() and _alive(pid):
            raise NetError(f"process {pid} is not in {group} after joining it")

    def cleanup(self) -> None:
        if self.root is not None:
            _rm_cgroup(self.root)


def tun_open(name: str) -> int:
    """Create TUN device `name` (IP packets, no packet-info header) and return its fd; the device
    lives while the fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


class Net:
    """The namespaces and links of one run. Use as a context manager: cleanup runs on any exit."""

    def __init__(self, boards: int, netem: Netem, cpu_cores: float, shaper: str = "auto") -> None:
        if not 1 <= boards <= 250:
            raise ValueError("boards: 1..250")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.broker_ns = f"{self.tag}-brk"
        self.board_ns = [f"{self.tag}-b{i}" for i in range(boards)]
        self.netem = netem
        if shaper == "auto":
            shaper = "netem" if netem_works() else "tun"
        if shaper not in ("netem", "tun"):
            raise ValueError("shaper: auto, netem or tun")
        self.shaper = shaper
        self.cpu = CpuLimit(self.tag, cpu_cores)
        self.client_if = f"{self.tag}c"
        self.client_net = self._free_client_net()
        self.broker_client_ip = str(self.client_net[2])  # the broker, as the clients see it
        self.made: list[str] = []
        self.wire: subprocess.Popen[str] | None = None

    @staticmethod
    def _free_client_net() -> ipaddress.IPv4Network:
        """A /30 for the root-side link that no address of the root namespace overlaps."""
        used = [
            ipaddress.ip_interface(word).network
            for word in ip("-4", "-o", "addr", "show", check=False).split()
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", word)
        ]
        for k in range(os.getpid() % 200, os.getpid() % 200 + 256):
            net = ipaddress.ip_network(f"10.214.{k % 256}.0/30")
            if not any(net.overlaps(u) for u in used):
                return net
        raise NetError("no free 10.214.x.0/30 in the root namespace")

    @staticmethod
    def broker_ip(i: int) -> str:
        """The broker's address on board i's link (what board i connects to)."""
        return f"{BOARD_NET}.{i}.1"

    @staticmethod
    def board_ip(i: int) -> str:
        return f"{BOARD_NET}.{i}.2"

    def describe(self) -> str:
        how = "tc netem on veth pairs" if self.shaper == "netem" else "userspace TUN wire (no sch_netem)"
        return f"{self.netem.describe()} via {how}"

    def __enter__(self) -> Net:
        try:
            self.build()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def build(self) -> None:
        b = self.broker_ns
        self._add_ns(b)
        # Clients' link: root <-> broker ns, unshaped.
        root_ip, ns_ip = self.client_net[1], self.client_net[2]
        ip("link", "add", self.client_if, "type", "veth", "peer", "name", "up0", "netns", b)
        ip("addr", "add", f"{root_ip}/30", "dev", self.client_if)
        ip("link", "set", self.client_if, "up")
        ip("-n", b, "addr", "add", f"{ns_ip}/30", "dev", "up0")
        ip("-n", b, "link", "set", "up0", "up")
        fds: list[int] = []
        try:
            for i, ns in enumerate(self.board_ns):
                self._add_ns(ns)
                if self.shaper == "netem":
                    ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"b{i}", "netns", b)
                else:  # two TUN devices made here, then moved into place; the wire holds their fds
                    for side, (where, name) in enumerate(((ns, "eth0"), (b, f"b{i}"))):
                        tmp = f"{self.tag}t{i}{'ab'[side]}"
                        fds.append(tun_open(tmp))
                        ip("link", "set", tmp, "netns", where)
                        ip("-n", where, "link", "set", tmp, "name", name)
                for where, dev, addr in ((ns, "eth0", self.board_ip(i)), (b, f"b{i}", self.broker_ip(i))):
                    ip("-n", where, "addr", "add", f"{addr}/30", "dev", dev)
                    ip("-n", where, "link", "set", dev, "up")
                if self.shaper == "netem":
                    for where, dev in ((ns, "eth0"), (b, f"b{i}")):
                        qdisc = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", *self.netem.args()]
                        _run([*self.exec_prefix(where), *qdisc])
            if self.shaper == "tun":
                self.wire = self._start_wire(fds)
        finally:
            for fd in fds:  # the wire has its own copies; the devices go when it ends
                os.close(fd)

    def _start_wire(self, fds: list[int]) -> subprocess.Popen[str]:
        n = self.netem
        cmd = [sys.executable, "-m", "benchmarks.netns", "wire", "--fds", ",".join(map(str, fds))]
        cmd += ["--delay-ms", str(n.delay_ms), "--jitter-ms", str(n.jitter_ms), "--loss-pct", str(n.loss_pct)]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise NetError(f"the TUN wire did not start (exit {proc.poll()})")
        return proc

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def link(self, i: int, up: bool) -> None:
        """Pull (or plug back) board i's cable."""
        if self.shaper == "netem":
            ip("-n", self.broker_ns, "link", "set", f"b{i}", "up" if up else "down")
        else:
            assert self.wire is not None and self.wire.stdin is not None
            self.wire.stdin.write(f"{'up' if up else 'down'} {i}\n")
            self.wire.stdin.flush()

    def cleanup(self) -> None:
        for ns in reversed(self.made):
            _kill_inside(ns)
        if self.wire is not None:
            self.wire.kill()
            self.wire.wait()
            self.wire = None
        for ns in reversed(self.made):
            ip("netns", "delete", ns, check=False)  # its links go with it
        self.made.clear()
        ip("link", "delete", self.client_if, check=False)  # gone with its peer already, normally
        self.cpu.cleanup()

    def leftovers(self) -> list[str]:
        """Namespaces, links and cgroups of this run still present (after cleanup: none)."""
        names = ip("netns", "list", check=False)
        left = [n for n in [self.broker_ns, *self.board_ns] if re.search(rf"^{n}\b", names, re.M)]
        if self.client_if in ip("-o", "link", "show", check=False):
            left.append(self.client_if)
        left += [str(self.cpu.root)] if self.cpu.root is not None and self.cpu.root.exists() else []
        return left


def wire(fds: list[int], netem: Netem, seed: int | None = None) -> None:
    """The userspace link: fds come in pairs (board side, broker side) per link. Each packet read
    on one side is dropped with probability loss, else written to the other side after
    delay ± jitter, never before the previous packet of its direction (no reordering). Commands
    on stdin: `down I` / `up I` (link I drops everything / is back); EOF ends the wire."""
    rng = random.Random(seed)
    peer = {fds[k]: fds[k ^ 1] for k in range(len(fds))}
    link_of = {fd: k // 2 for k, fd in enumerate(fds)}
    down: set[int] = set()
    last: dict[int, float] = {}  # out fd -> time its latest packet is due
    due: list[tuple[float, int, int, bytes]] = []
    sel = selectors.DefaultSelector()
    for fd in fds:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    print("ready", flush=True)
    n = 0
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        for key, _ in sel.select(timeout):
            if key.fileobj is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    return
                cmd, _, arg = line.partition(" ")
                (down.add if cmd == "down" else down.discard)(int(arg))
                continue
            fd = int(key.fd)
            while True:
                try:
                    packet = os.read(fd, 65_536)
                except BlockingIOError:
                    break
                if link_of[fd] in down or rng.random() * 100 < netem.loss_pct:
                    continue
                out = peer[fd]
                at = time.monotonic() + (netem.delay_ms + rng.uniform(-1, 1) * netem.jitter_ms) / 1000
                at = max(at, last.get(out, 0.0))
                last[out] = at
                n += 1
                heapq.heappush(due, (at, n, out, packet))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, packet = heapq.heappop(due)
            if link_of[out] not in down:  # a packet in flight when the cable is pulled is lost
                with contextlib.suppress(OSError):  # the device went away (cleanup)
                    os.write(out, packet)


def netem_works() -> bool:
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        tc = ["tc", "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"]
        _run(["ip", "netns", "exec", name, *tc])
        return True
    except NetError:
        return False
    finally:
        ip("netns", "delete", name, check=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="the userspace link of benchmarks/fleet.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wire")
    w.add_argument("--fds", required=True)
    w.add_argument("--delay-ms", type=float, default=20.0)
    w.add_argument("--jitter-ms", type=float, default=10.0)
    w.add_argument("--loss-pct", type=float, default=1.0)
    w.add_argument("--seed", type=int)
    sub.add_parser("clean-stale", help="remove namespaces and cgroups of dead runs")
    a = ap.parse_args()
    if a.cmd == "wire":
        with contextlib.suppress(KeyboardInterrupt):
            wire([int(x) for x in a.fds.split(",")], Netem(a.delay_ms, a.jitter_ms, a.loss_pct), a.seed)
    else:
        print("\n".join(clean_stale()) or "nothing stale")
