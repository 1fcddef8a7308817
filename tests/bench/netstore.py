"""The network store of the benchmark: a directory served over a real network link.

    server netns (sshd, internal-sftp;   <-- veth, tbf rate -->  client netns
                  nginx, if serve_http)                                ^
    root netns: sshfs --TCP--> 127.0.0.1:PORT  delaying relay ---------+
                squid --HTTP-> 127.0.0.1:PORT2 delaying relay ---------+

* Two network namespaces of our own, joined by a veth pair with a private /30
  (both ends inside our namespaces; nothing else is ever addressed).
* sshd (Debian's openssh-server) runs in the server namespace on its veth
  address, with its own config, a throwaway host key and an authorized key
  made in a temp dir; the system's sshd config and /root/.ssh are not touched.
* Rate: a tbf qdisc on both veth ends. Latency: this kernel has no netem, so
  a small user-space TCP relay (this file run as `relay`) accepts on
  127.0.0.1 in the root namespace, connects out from the client namespace,
  and holds every chunk for RTT/2 in each direction, preserving order.
* sshfs (Debian's) runs in the root namespace and mounts the store through
  the relay.
* `serve_http(root)` serves a directory (a published image) the same way:
  nginx (tests/helpers/http.py) in the server namespace on its veth
  address, behind a relay of its own, so HTTP from the client side (squid,
  imagestore.py) crosses the same delayed, rate-limited link as SFTP. The
  origin's access log counts the requests that crossed it.

Traffic is counted at the client veth (bytes and packets, /proc/net/dev of
the client namespace, i.e. SSH-encrypted SFTP plus TCP/IP headers), and SFTP
requests from the sftp-server's own log (one DEBUG line per request).

Everything is undone by `close()` (also on Ctrl-C): the sshfs mount, sshd,
nginx and the relays (killed by PID), the namespaces and the veth pair.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

# tests/ (helpers.http); never tests/helpers itself, whose http.py would
# shadow the standard library's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLONE_NEWNET = 0x40000000
SUBNET = "10.213.47"  # a /30: .1 client end, .2 server end; only inside our namespaces
# Debian package -> a program it installs (present: nothing to install)
APT_PACKAGES = {"sshfs": "sshfs", "openssh-server": "/usr/sbin/sshd"}


def run(argv: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, **kw)


def in_netns(ns: str) -> list[str]:
    """The command prefix that runs a program in network namespace `ns`.
    nsenter joins the network namespace only: `ip netns exec` makes a mount
    namespace too, a copy holding every FUSE mount of the moment (other
    users' included), each then kept alive by it after its unmount."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def install(packages: dict[str, str] = APT_PACKAGES) -> None:
    """The Debian packages (name -> a program of theirs) whose program is
    missing: sshfs and openssh-server unless told others."""
    missing = [name for name, program in packages.items() if not shutil.which(program)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    # another apt-get on the machine (a shared one) may hold dpkg's lock a while
    subprocess.run(["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", *missing],
                   check=True, env=env)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _port_open(host: str, port: int, netns_fd: int | None = None) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/mounts", "rb") as f:
        return any(line.split()[1] == target for line in f)


class NetStore:
    """Serve `store` from a server namespace; mount it with sshfs at `mountpoint`
    (with sftp=False: the link alone, for serve_http)."""

    def __init__(self, store: Path, mountpoint: Path, rtt_ms: float = 1.0, rate_mbit: float = 1000.0,
                 tag: str | None = None, sftp: bool = True):
        self.sftp = sftp
        self.store = Path(store).resolve()
        self.mountpoint = Path(mountpoint)
        self.rtt_ms, self.rate_mbit = rtt_ms, rate_mbit
        tag = tag or f"{os.getpid() % 100000}"
        self.ns_srv, self.ns_cli = f"rlfsb{tag}s", f"rlfsb{tag}c"
        self.if_srv, self.if_cli = f"rb{tag}s", f"rb{tag}c"
        self.addr_srv, self.addr_cli = f"{SUBNET}.2", f"{SUBNET}.1"
        self.tmp = Path(tempfile.mkdtemp(prefix="rlfsb-net-"))
        self.sshd: subprocess.Popen | None = None
        self.relays: list[subprocess.Popen] = []
        self.relay_port = 0  # sshd's
        self.origin = None  # helpers.http.NginxOrigin, once serve_http
        self.sftp_log = self.tmp / "sftp.log"
        self._made_run_sshd = False
        self._netns_made: list[str] = []
        self.client_key = self.tmp / "client_key"  # what every SFTP client of ours logs in with
        # remember=-1: sshfs numbers inodes in lookup order (SFTP has no inode
        # numbers) and, by default, numbers a file again once the kernel
        # forgets it (any drop_caches on the machine): rez-lazyfs's file
        # identity (size, mtime, ctime, inode) then changes under a running
        # mount and its reads fail with EIO ("changed in the store"). With it
        # a file keeps its number for the life of the sshfs mount.
        self.sshfs_options = ["-o", "ro", "-o", "IdentityFile=" + str(self.client_key),
                              "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                              "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "remember=-1",
                              "-F", "/dev/null"]
        self._sessions: dict[Path, set[int]] = {}  # sshfs mount point -> its sshd session's pids

    # -- set up ----------------------------------------------------------------
    def start(self) -> NetStore:
        try:
            self._network()
            if self.sftp:
                self._sshd()
                self.relay_port = self._relay(22)
                self.mount()
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        for ns in (self.ns_srv, self.ns_cli):
            run(["ip", "netns", "add", ns])
            self._netns_made.append(ns)
        run(["ip", "link", "add", self.if_cli, "type", "veth", "peer", "name", self.if_srv])
        run(["ip", "link", "set", self.if_cli, "netns", self.ns_cli])
        run(["ip", "link", "set", self.if_srv, "netns", self.ns_srv])
        for ns, dev, addr in ((self.ns_cli, self.if_cli, self.addr_cli),
                              (self.ns_srv, self.if_srv, self.addr_srv)):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            run(["ip", "-n", ns, "link", "set", dev, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Rate in each direction (egress of each end). burst: at least one
            # jiffy's worth at this rate, as tbf requires.
            rate = f"{self.rate_mbit}mbit"
            burst = max(64 * 1024, int(self.rate_mbit * 1e6 / 8 / 250))
            run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                 "burst", str(burst), "latency", "50ms"])

    def _sshd(self) -> None:
        t = self.tmp
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", t / "host_key"])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key])
        shutil.copy(f"{self.client_key}.pub", t / "authorized_keys")
        (t / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.addr_srv}", "Port 22",
            f"HostKey {t / 'host_key'}", f"AuthorizedKeysFile {t / 'authorized_keys'}",
            f"PidFile {t / 'sshd.pid'}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "UseDNS no", "X11Forwarding no", "AllowTcpForwarding no",
            "LogLevel INFO",
            # One log line per SFTP request: the request count of direct and copy.
            f"Subsystem sftp /usr/lib/openssh/sftp-server -e -l DEBUG1 2>>{t / 'sftp.log'}",
            ""]))
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation directory
            os.makedirs("/run/sshd", mode=0o755)
            self._made_run_sshd = True
        self.sshd = subprocess.Popen(
            [*in_netns(self.ns_srv), "/usr/sbin/sshd", "-D", "-e", "-f", str(t / "sshd_config")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.tmp / "sshd.log", "ab"),
            start_new_session=True)
        _wait_for(lambda: self.sshd.poll() is not None or self._ns_listening(self.ns_srv, 22), 10,
                  "sshd to listen")
        if self.sshd.poll() is not None:
            raise RuntimeError(f"sshd exited: {(self.tmp / 'sshd.log').read_text()[-2000:]}")

    def _ns_listening(self, ns: str, port: int) -> bool:
        out = run([*in_netns(ns), "ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    def _relay(self, server_port: int) -> int:
        """A delaying relay from 127.0.0.1 in the root namespace to the
        server's `server_port`; its local port."""
        relay = subprocess.Popen(
            [sys.executable, __file__, "relay", "--netns", self.ns_cli, "--to",
             f"{self.addr_srv}:{server_port}", "--delay-ms", str(self.rtt_ms / 2)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(self.tmp / "relay.log", "ab"),
            start_new_session=True)
        self.relays.append(relay)
        line = relay.stdout.readline().decode().strip()
        if not line.startswith("port "):
            raise RuntimeError(f"relay did not start: {(self.tmp / 'relay.log').read_text()[-2000:]}")
        return int(line.split()[1])

    def serve_http(self, root: Path) -> str:
        """Serve `root` with nginx in the server namespace; the URL the client
        side uses (the root namespace's end of a relay to it)."""
        from helpers.http import NginxOrigin

        self.origin = NginxOrigin(root, host=self.addr_srv, netns=self.ns_srv)
        return f"http://127.0.0.1:{self._relay(self.origin.port)}"

    # -- the sshfs mount -------------------------------------------------------
    def mount(self) -> None:
        self.mount_at(self.mountpoint)

    def umount(self) -> None:
        self.umount_at(self.mountpoint)

    def mount_at(self, mountpoint: Path) -> None:
        """An sshfs mount of the store at `mountpoint` (a session of its own)."""
        mountpoint = Path(mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        before = set(self._sshd_pids())
        run(["sshfs", f"root@127.0.0.1:{self.store}", mountpoint, "-p", self.relay_port,
             *self.sshfs_options])
        _wait_for(lambda: is_mounted(mountpoint), 10, "the sshfs mount")
        self._sessions[mountpoint] = set(self._sshd_pids()) - before

    def umount_at(self, mountpoint: Path) -> None:
        mountpoint = Path(mountpoint)
        if is_mounted(mountpoint):
            r = run(["fusermount3", "-u", mountpoint], check=False)
            if r.returncode != 0:
                run(["fusermount3", "-u", "-z", mountpoint], check=False)
        # the session's sshd children end when the ssh client goes
        session = self._sessions.pop(mountpoint, set())
        if session:
            _wait_for(lambda: not session & set(self._sshd_pids()), 10, "the SFTP session to end")
        elif not self._sessions:
            _wait_for(lambda: len(self._sshd_pids()) <= 1, 10, "the SFTP session to end")

    def remount(self) -> None:
        """A cold sshfs: no attribute, directory or page cache left."""
        self.umount()
        self.mount()

    # -- counters --------------------------------------------------------------
    def counters(self) -> dict:
        """Client veth bytes/packets (both directions) and SFTP requests so far."""
        info = json.loads(run(["ip", "-n", self.ns_cli, "-s", "-j", "link", "show", self.if_cli]).stdout)
        s = info[0]["stats64"]
        requests = 0
        if self.sftp_log.exists():
            with open(self.sftp_log, "rb") as f:
                requests = sum(1 for line in f if _SFTP_REQUEST.search(line))
        return {"net_rx_bytes": s["rx"]["bytes"], "net_tx_bytes": s["tx"]["bytes"],
                "net_packets": s["rx"]["packets"] + s["tx"]["packets"], "sftp_requests": requests}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        d = {k: after[k] - before[k] for k in before}
        d["net_bytes"] = d["net_rx_bytes"] + d["net_tx_bytes"]
        return d

    # -- tear down -------------------------------------------------------------
    def _server_pids(self) -> list[int]:
        if self.ns_srv not in self._netns_made:
            return []
        out = run(["ip", "netns", "pids", self.ns_srv], check=False).stdout
        return [int(p) for p in out.split()]

    def _sshd_pids(self) -> list[int]:
        """sshd and its session processes (the server namespace may hold nginx too)."""
        pids = []
        for pid in self._server_pids():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() in ("sshd", "sftp-server"):
                        pids.append(pid)
            except OSError:
                continue
        return pids

    def close(self) -> None:
        errors = []
        for step in (self._close_mount, self._close_relays, self._close_origin, self._close_sshd,
                     self._close_network):
            try:
                step()
            except Exception as e:  # keep tearing down
                errors.append(f"{step.__name__}: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            print("netstore teardown problems: " + "; ".join(errors), file=sys.stderr)

    def _close_mount(self) -> None:
        for mountpoint in {self.mountpoint, *self._sessions}:
            if is_mounted(mountpoint):
                r = run(["fusermount3", "-u", mountpoint], check=False)
                if r.returncode != 0:
                    run(["fusermount3", "-u", "-z", mountpoint], check=False)

    def _close_relays(self) -> None:
        for relay in self.relays:
            if relay.poll() is None:
                relay.terminate()
                try:
                    relay.wait(5)
                except subprocess.TimeoutExpired:
                    relay.kill()
                    relay.wait()

    def _close_origin(self) -> None:
        if self.origin is not None:
            problems, self.origin = self.origin.close(), None
            if problems:
                raise RuntimeError("; ".join(problems))

    def _close_sshd(self) -> None:
        # sshd and its session children: every process in our server namespace
        pids = set(self._server_pids())
        if self.sshd:
            pids.add(self.sshd.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.sshd:
            try:
                self.sshd.wait(5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        for pid in self._server_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
            self._made_run_sshd = False

    def _close_network(self) -> None:
        # deleting a namespace deletes the veth end in it, and with it the pair
        for ns in list(self._netns_made):
            run(["ip", "netns", "del", ns], check=False)
            self._netns_made.remove(ns)

    def __enter__(self) -> NetStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"transport": "sshfs (SFTP over OpenSSH) through a delaying TCP relay",
                "rtt_ms": self.rtt_ms, "rate_mbit": self.rate_mbit,
                "link": f"veth {self.addr_cli}/30 <-> {self.addr_srv}/30 between two private "
                        f"network namespaces, tbf on both ends",
                "sshfs_options": "defaults + ro",
                "sshfs_version": run(["sshfs", "--version"], check=False).stdout.splitlines()[0:1],
                "traffic_counted": "client veth rx+tx bytes (encrypted SSH incl. TCP/IP headers); "
                                   "SFTP requests from the sftp-server DEBUG log"}


# sftp-server logs "request N: sent <reply>" at DEBUG1 once for every request it answers
_SFTP_REQUEST = re.compile(rb"request \d+: sent ")


# -- the delaying relay (run as a separate process) ----------------------------
def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class _Pipe:
    """One direction: a reader thread stamps each chunk with its due time, a
    writer thread sends it then. Order is kept; nothing is held back longer
    than the delay plus the time to send what came before it."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float):
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: deque = deque()
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.src.recv(1 << 18)
            except OSError:
                data = b""
            with self.cond:
                self.queue.append((time.monotonic() + self.delay, data))
                self.cond.notify()
            if not data:
                return

    def _write(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                due, data = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                return


def relay_main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="netstore.py relay")
    ap.add_argument("--netns", required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    args = ap.parse_args(argv)
    host, port = args.to.rsplit(":", 1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    # From here on, new sockets are made in the client namespace: the
    # listener stays on the root namespace's loopback.
    _setns(f"/run/netns/{args.netns}")
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    print(f"port {listener.getsockname()[1]}", flush=True)
    delay = args.delay_ms / 1000
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, int(port)))
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _Pipe(client, upstream, delay)
        _Pipe(upstream, client, delay)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay_main(sys.argv[2:])
    else:
        # a manual check: python netstore.py STORE MOUNTPOINT  (Ctrl-C to tear down)
        ns = NetStore(Path(sys.argv[1]), Path(sys.argv[2]))
        with ns:
            print(f"mounted {ns.store} at {ns.mountpoint} via 127.0.0.1:{ns.relay_port}; Ctrl-C ends")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
