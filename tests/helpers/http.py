"""Real HTTP servers for the HTTP store's tests and benchmarks: nginx as the
origin of a published image, squid as the proxy cache in front of it.

Both run on 127.0.0.1 on a free port picked for them (nginx optionally on
another address inside a network namespace: the benchmark's origin across
its delayed link, tests/bench/netstore.py), each as its Debian
service user (nginx as www-data, squid as proxy, through setpriv), with a
config file and a work directory of their own under /tmp (pytest's
directories are 0700: the service users could not enter them). Each runs in
a process group of its own; stopping it signals that group by its id and
then checks that no process of it is left. The system's own nginx and squid
configs, logs and spool are never touched.

* ``NginxOrigin`` serves a directory as static files with the cache headers
  the image format needs (objects immutable for a year, the manifest for 61 s:
  squid does not cache what expires within 60 s); its access log says which
  paths reached the origin (``requests()``). nginx keeps object files open
  (open_file_cache): a test that changes an existing object (tampering) does
  it with ``put()``, or calls ``reload()`` after changing it by hand.
* ``SquidProxy`` is a squid 5 with its own cache directory (``squid -z``
  first), collapsed forwarding on, accepting only loopback clients going to
  loopback origins; optionally forwarding everything to a parent proxy (a
  hierarchy, or a proxy whose parent is dead: it answers 503). Its access log
  says HIT or MISS per URL (``requests()``). ``kill()`` (SIGKILL) and
  ``freeze()`` (SIGSTOP: a hung proxy) are the failover tests' faults.
* Fixtures (import the ``*_fixture`` names into a test module): the
  factories ``nginx_origin`` and ``squid_proxy``; teardown stops every server
  they started, even when the test failed, and fails the test if one is
  left behind.

The classes work outside pytest too (tests/bench/http_client.py): call
``close()`` (or use them as context managers). Start (and restart) a server
from a thread that outlives it: the parent-death signal that kills it with
its starter fires when the starting thread ends, not only the process. A script run from this
directory must take it off sys.path (as faults.py does): this module would
shadow the standard library's http package.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.mounts import tail

APT_PACKAGES = "nginx-light squid"  # what .ci/setup installs for these
NGINX = "/usr/sbin/nginx"
SQUID = "/usr/sbin/squid"
START_TIMEOUT = 15  # seconds for a server to listen on its port
STOP_TIMEOUT = 10  # seconds for a server to exit once signalled
LOG_SETTLE = 0.05  # a log is read once it has not grown for this long

OBJECTS_CACHE_CONTROL = "public, max-age=31536000, immutable"
MANIFEST_CACHE_CONTROL = "public, max-age=61"


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: split after it.
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _listening_inodes(host: str, port: int, pid: int) -> set[str]:
    """Socket inodes listening on *host*:*port* in the network namespace of
    process *pid* (its /proc/PID/net/tcp)."""
    want = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    inodes = set()
    try:
        with open(f"/proc/{pid}/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:  # it exited
        return inodes
    for line in lines:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def _owns_socket(pids: list[int], inodes: set[str]) -> bool:
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _read_settled(path: Path) -> str:
    """The log's text once it stopped growing: a server writes its log line
    just after the response, so a client can be a moment ahead of it."""
    size = -1
    while True:
        try:
            now = path.stat().st_size
        except FileNotFoundError:
            return ""
        if now == size:
            return path.read_text(errors="replace")
        size = now
        time.sleep(LOG_SETTLE)


class _Server:
    """One server process (and its children) in a process group of its own,
    running as *user*, on host:port (127.0.0.1 unless told), in a work
    directory under /tmp; with *netns* (a name in /run/netns), inside
    that network namespace."""

    kind = "server"
    user = "nobody"
    binary = "/bin/false"

    def __init__(self, prefix: str, *, host: str = "127.0.0.1", netns: str | None = None):
        if not os.path.exists(self.binary):
            raise RuntimeError(f"{self.binary} is missing: apt-get install {APT_PACKAGES} (.ci/setup)")
        self.work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.work.chmod(0o755)
        entry = pwd.getpwnam(self.user)
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        os.chown(self.work, self._uid, self._gid)
        self.host, self.netns = host, netns
        self.port = 0
        self._started = False  # once it has: restarts keep the port
        self._proc: subprocess.Popen | None = None
        self._stderr = self.work / "stderr.log"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what each server says ----------------------------------------------
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _diagnostics(self) -> str:
        return f"{self._stderr}:\n{tail(self._stderr)}"

    # -- life cycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the server (again: on the same port) and return once it
        listens there. The first start picks a free port, and another if
        someone took that one in the meantime."""
        if self._proc is not None:
            raise RuntimeError(f"{self.kind} on port {self.port} is already running")
        for _ in range(1 if self._started else 5):
            if not self._started:
                self.port = free_port()
            self._write_config()
            if self._launch():
                self._started = True
                return
        raise RuntimeError(f"{self.kind} did not start on {self.host}:{self.port}\n{self._diagnostics()}")

    def _launch(self) -> bool:
        # nsenter joins the network namespace only: `ip netns exec` makes a
        # mount namespace too, a copy holding every FUSE mount there is now
        # (other tests' included), which would then outlive its unmount.
        in_netns = ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.netns else []
        argv = [*in_netns, "setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups",
                "--pdeathsig", "SIGKILL", "--",
                *self._argv()]
        with open(self._stderr, "ab") as err:
            # setpriv execs the server (as nsenter execs setpriv):
            # the Popen pid is the server's, and the leader of the new
            # session (and process group) it makes; it gets SIGKILL if this
            # process dies before stopping it.
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                          cwd=self.work, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _owns_socket(processes_in_group(self._proc.pid),
                            _listening_inodes(self.host, self.port, self._proc.pid)):
                return True
            time.sleep(0.02)
        self._end(signal.SIGKILL)
        return False

    def _end(self, sig: int, timeout: float = STOP_TIMEOUT) -> list[int]:
        """Signal the server's process group; wait for all of it to exit;
        SIGKILL what is left. Returns the pids that survived even that."""
        proc, self._proc = self._proc, None
        if proc is None:
            return []
        pgid = proc.pid
        try:
            os.killpg(pgid, sig)
            os.killpg(pgid, signal.SIGCONT)  # a frozen server acts on it
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while processes_in_group(pgid) and time.monotonic() < deadline:
            proc.poll()  # reap the leader as soon as it exits
            time.sleep(0.02)
        if processes_in_group(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT
            while processes_in_group(pgid) and time.monotonic() < deadline:
                proc.poll()
                time.sleep(0.02)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        self._after_exit()
        return processes_in_group(pgid)

    def _after_exit(self) -> None:
        """Remove what the server leaves outside its work directory."""

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, connections reset."""
        self._check_gone(self._end(signal.SIGKILL))

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self._proc.pid, signal.SIGCONT)

    def _check_gone(self, survivors: list[int]) -> None:
        if survivors:
            raise RuntimeError(f"{self.kind} processes {survivors} survived SIGKILL")

    def close(self) -> list[str]:
        """Kill the server if it runs and remove its work directory; returns
        problems (a process that would not die)."""
        survivors = self._end(signal.SIGKILL) if self._proc is not None else []
        if survivors:
            return [f"{self.kind} on port {self.port}: processes {survivors} survived SIGKILL"]
        shutil.rmtree(self.work, ignore_errors=True)
        return []


@dataclass(frozen=True)
class OriginRecord:
    status: int
    method: str
    path: str  # the request URI, as sent
    bytes: int  # body bytes sent


class NginxOrigin(_Server):
    """nginx serving *root* (by default ``self.root``, a fresh directory the
    test fills) as static files on ``self.url``."""

    kind = "nginx"
    user = "www-data"
    binary = NGINX

    def __init__(self, root: Path | None = None, *, host: str = "127.0.0.1", netns: str | None = None):
        super().__init__("lazyfs-nginx-", host=host, netns=netns)
        self.access_log = self.work / "access.log"
        try:
            if root is None:
                root = self.work / "root"
                root.mkdir()
                root.chmod(0o755)
            self.root = Path(root).resolve()
            self._check_readable()
            self.start()
        except BaseException:
            self.close()
            raise

    def _check_readable(self) -> None:
        probe = subprocess.run(["setpriv", f"--reuid={self._uid}", f"--regid={self._gid}",
                                "--clear-groups", "--", "test", "-r", self.root, "-a", "-x", self.root],
                               capture_output=True)
        if probe.returncode != 0:
            raise ValueError(f"{self.root}: {self.user} cannot read it (pytest's tmp_path is 0700): "
                             "serve a directory under public_tmp, or the origin's own .root")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def put(self, path: str, data: bytes) -> Path:
        """Write *data* at *path* below the root (directories 0755, file 0644:
        readable by nginx). Replacing a file that exists reloads nginx
        (`reload()`), so the next request is answered with the new bytes."""
        target = self.root / path
        for parent in reversed(target.relative_to(self.root).parents[:-1]):
            (self.root / parent).mkdir(exist_ok=True)
            (self.root / parent).chmod(0o755)  # whatever the umask
        replacing = target.exists()
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        staged.write_bytes(data)
        staged.chmod(0o644)
        staged.rename(target)
        if replacing:
            self.reload()
        return target

    def reload(self) -> None:
        """Make nginx forget the files it holds open (open_file_cache keeps a
        replaced file's old descriptor, and its size, for up to a minute): a
        restart on the same port, a few tens of milliseconds."""
        self.stop()
        self.start()

    def _argv(self) -> list[str]:
        # -e: nginx opens its error log before reading the config; without
        # it, that is /var/log/nginx/error.log.
        return [NGINX, "-e", str(self.work / "error.log"), "-p", str(self.work), "-c",
                str(self.work / "nginx.conf")]

    def _write_config(self) -> None:
        w = self.work
        (w / "nginx.conf").write_text(f"""\
daemon off;
# One process and no workers: a worker outlives a killed master, and this
# one dies with the test process (setpriv --pdeathsig).
master_process off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format origin '$status $request_method $request_uri $body_bytes_sent';
    access_log {w}/access.log origin;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    keepalive_timeout 300s;
    open_file_cache max=10000;
    server {{
        listen {self.host}:{self.port} reuseport;
        root {self.root};
        location /objects/ {{
            add_header Cache-Control "{OBJECTS_CACHE_CONTROL}" always;
        }}
        location = /manifest {{
            # Replaced at every publish: a cached descriptor would keep
            # serving the previous revision for open_file_cache_valid (60 s).
            open_file_cache off;
            add_header Cache-Control "{MANIFEST_CACHE_CONTROL}" always;
        }}
    }}
}}
""")
        (w / "tmp").mkdir(exist_ok=True)
        os.chown(w / "tmp", self._uid, self._gid)

    def _diagnostics(self) -> str:
        return f"{super()._diagnostics()}\n{self.work / 'error.log'}:\n{tail(self.work / 'error.log')}"

    def stop(self) -> None:
        """Fast shutdown (SIGTERM: open connections are closed)."""
        self._check_gone(self._end(signal.SIGTERM))

    def log(self) -> list[OriginRecord]:
        records = []
        for line in _read_settled(self.access_log).splitlines():
            status, method, path, sent = line.split(" ")
            records.append(OriginRecord(int(status), method, path, int(sent)))
        return records

    def requests(self, path_prefix: str = "/objects/") -> list[str]:
        """The request paths that reached the origin, in order, one per
        request (whatever the answer): `.count(path)` is how often."""
        return [r.path for r in self.log() if r.path.startswith(path_prefix)]


@dataclass(frozen=True)
class ProxyRecord:
    code: str  # squid's result code: TCP_MISS, TCP_MEM_HIT, TCP_REFRESH_MODIFIED, ...
    status: int  # the status squid answered
    method: str
    url: str
    hierarchy: str  # HIER_DIRECT, HIER_NONE, FIRSTUP_PARENT, ...

    @property
    def hit(self) -> bool:
        """Answered from squid's cache, without asking upstream."""
        return "HIT" in self.code


class SquidProxy(_Server):
    """squid 5 on ``self.url`` with its own cache; with *parent* (another
    SquidProxy), every miss goes to that parent, never direct."""

    kind = "squid"
    user = "proxy"
    binary = SQUID

    def __init__(self, parent: SquidProxy | None = None):
        super().__init__("lazyfs-squid-")
        self.parent = parent
        # The service name keeps this squid's shared-memory segments
        # (/dev/shm/NAME-*.shm) apart from any other squid's.
        self.name = f"rlz{uuid.uuid4().hex[:10]}"
        self.access_log = self.work / "access.log"
        self.cache_dir = self.work / "cache"
        try:
            self.port = free_port()
            self._write_config()
            self._run_as(["-z", "-N"])  # make the cache directories
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run_as(self, args: list[str]) -> None:
        done = subprocess.run(["setpriv", f"--reuid={self._uid}", f"--regid={self._gid}", "--clear-groups",
                               "--", SQUID, *args, "-f", str(self.work / "squid.conf"), "-n", self.name],
                              capture_output=True, text=True, cwd=self.work, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"squid {' '.join(args)} failed:\n{done.stderr}\n{tail(self.work / 'cache.log')}")

    def _argv(self) -> list[str]:
        return [SQUID, "-N", "-d1", "-f", str(self.work / "squid.conf"), "-n", self.name]

    def _write_config(self) -> None:
        w = self.work
        upstream = ""
        if self.parent is not None:
            upstream = (f"cache_peer 127.0.0.1 parent {self.parent.port} 0 no-query no-digest default "
                        "name=parent\nnever_direct allow all\n")
        (w / "squid.conf").write_text(f"""\
http_port 127.0.0.1:{self.port}
# Unique: a squid that sees its own name in a Via header refuses a loop.
visible_hostname {self.name}
pid_filename {w}/squid.pid
coredump_dir {w}
cache_log {w}/cache.log
logformat lazyfs %Ss %>Hs %rm %ru %Sh
access_log stdio:{w}/access.log lazyfs
logfile_rotate 0
cache_store_log none
netdb_filename none
cache_dir ufs {self.cache_dir} 512 4 16
cache_mem 128 MB
maximum_object_size 1024 MB
maximum_object_size_in_memory 1 MB
# One origin fetch for concurrent misses of one URL.
collapsed_forwarding on
# Cache what expires soon too (the manifest lives 61 s).
minimum_expiry_time 0
# A Range request for an object not cached yet fetches all of it once
# (squid never stores a 206), so later ranges are hits.
range_offset_limit -1
dns_nameservers 127.0.0.1
pinger_enable off
shutdown_lifetime 1 seconds
{upstream}acl to_loopback dst 127.0.0.1
http_access allow localhost to_loopback
http_access deny all
""")

    def _after_exit(self) -> None:
        # Segments squid removes when it exits normally; not after SIGKILL.
        for segment in Path("/dev/shm").glob(f"{self.name}-*"):
            segment.unlink(missing_ok=True)

    def _diagnostics(self) -> str:
        return f"{super()._diagnostics()}\n{self.work / 'cache.log'}:\n{tail(self.work / 'cache.log')}"

    def stop(self) -> None:
        """squid's own shutdown (SIGTERM: about 3 s here), leaving its cache
        consistent for the next start."""
        self._check_gone(self._end(signal.SIGTERM))

    def log(self) -> list[ProxyRecord]:
        records = []
        for line in _read_settled(self.access_log).splitlines():
            code, status, method, url, hierarchy = line.split(" ")
            records.append(ProxyRecord(code, int(status), method, url, hierarchy))
        return records

    def requests(self, url_contains: str = "/objects/") -> list[ProxyRecord]:
        """What squid answered, in order, for URLs containing *url_contains*."""
        return [r for r in self.log() if url_contains in r.url]

    def close(self) -> list[str]:
        problems = super().close()
        self._after_exit()
        return problems


class _Factory:
    """A fixture's factory: every server it made is closed at teardown."""

    def __init__(self, make):
        self._make = make
        self.servers: list[_Server] = []

    def __call__(self, *args, **kwargs):
        server = self._make(*args, **kwargs)
        self.servers.append(server)
        return server

    def teardown(self) -> list[str]:
        problems = []
        # Children (a squid's parent was made first) go first.
        for server in reversed(self.servers):
            problems += server.close()
        return problems


def _yield_then_check(factory: _Factory):
    try:
        yield factory
    finally:
        problems = factory.teardown()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(name="nginx_origin")
def nginx_origin_fixture():
    """Factory: ``origin = nginx_origin(root=None)`` (see NginxOrigin)."""
    yield from _yield_then_check(_Factory(NginxOrigin))


@pytest.fixture(name="squid_proxy")
def squid_proxy_fixture():
    """Factory: ``proxy = squid_proxy(parent=None)`` (see SquidProxy)."""
    yield from _yield_then_check(_Factory(SquidProxy))
