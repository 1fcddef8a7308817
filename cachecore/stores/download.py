"""The download manager of the HTTP store: GETs the files of one published
image (one base URL) through a list of proxies, with failover, time bounds
and one transfer per path in flight.

Called from the store's worker threads (never the event loop), so it is
thread-safe and blocking; no trio in here.

Proxies are given in CernVM-FS syntax (`parse_proxies`):
``"http://p1:3128|http://p2:3128;http://p3:3128"``: ``;`` separates groups
tried in order; ``|`` separates proxies of one group, which share the load
(a path always goes to the same one first: hash of the path, so each object
is cached by one proxy of the group, not all). ``DIRECT`` (to the origin,
no proxy) is used only where written; the empty string means DIRECT only.
Proxy environment variables are never used.

A request goes to its first route (a proxy, or DIRECT); a connection refused,
a connect timeout, a transfer slower than the low-speed limit, a truncated
body or an answer other than 200/404 (a squid 503 when it cannot reach the
origin counts: cvmfs PR #2773) marks that route failed, and the request moves
to the next proxy of the group, then to the next group. A failed route is
passed over for `backoff` seconds by later requests (tried last, not never:
if everything else fails too it is still asked), then tried again, so a mount
recovers by itself. A 404 is definitive: NotFound, no failover. When every
route failed, or the request's time (`timeout`) is spent, StoreUnavailable
names the URL and what each route answered.

Client: pycurl, one easy handle per concurrent request, taken from a pool
(each handle keeps its connections alive between requests, whichever thread
uses it next). Handles are made on first use: a Downloader may be made
before the daemon forks, but not used on both sides of a fork. Chosen by
measurement (tests/bench/results/http_client.md: 16 threads, 4 KiB objects
through squid): 73% of bare pycurl's GET/s, 2.7x urllib3's. The gap to bare
pycurl is the Python work per GET (single flight, route plan, options and
counters: ~10 us timed alone) held under the GIL that 16 threads share.
"""
from __future__ import annotations

import io
import logging
import ssl
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Iterable

import pycurl

from ..errors import NotFound, StoreUnavailable
from ..singleflight import ThreadSingleFlight

log = logging.getLogger(__name__)

DIRECT = "DIRECT"

CONNECT_TIMEOUT = 2.0  # seconds to connect to a proxy or the origin
LOW_SPEED_LIMIT = 1024  # bytes/s below which, for LOW_SPEED_TIME...
LOW_SPEED_TIME = 3  # ...seconds (whole seconds: libcurl's unit), a transfer is failed
BACKOFF = 30.0  # seconds a failed route is passed over
MAX_BYTES = 256 * 1024 * 1024  # an answer larger than this is a broken one
NO_CACHE_HEADERS = ["Cache-Control: no-cache", "Pragma: no-cache"]


def parse_proxies(spec: str) -> list[list[str]]:
    """``"http://a:3128|http://b:3128;DIRECT"`` -> [[a, b], [DIRECT]]; ""
    -> [[DIRECT]]. Raises ValueError saying what is wrong."""
    if not spec.strip():
        return [[DIRECT]]
    groups, seen = [], set()
    for group_text in spec.split(";"):
        group = []
        for member in group_text.split("|"):
            member = member.strip()
            if not member:
                raise ValueError(f"proxy list {spec!r}: an empty entry (around '|' or ';')")
            if member != DIRECT:
                member = _checked_proxy_url(spec, member)
            if member in seen:
                raise ValueError(f"proxy list {spec!r}: {member} is listed twice")
            seen.add(member)
            group.append(member)
        groups.append(group)
    return groups


def _checked_proxy_url(spec: str, text: str) -> str:
    bad = ValueError(f"proxy list {spec!r}: {text!r} is neither http://HOST:PORT nor {DIRECT}")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise bad from None
    if (parts.scheme != "http" or not parts.hostname or port is None or parts.username
            or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise bad
    return f"http://{parts.netloc}"


@dataclass(frozen=True)
class Download:
    data: bytes = field(repr=False)
    url: str
    via: str  # the proxy that answered, or DIRECT


class _RouteFailed(Exception):
    """The route did not give a usable answer (the reason is the message)."""


@dataclass
class _Route:
    name: str  # a proxy URL or DIRECT
    down_until: float = 0.0  # monotonic time before which it is passed over
    failed_at: float = 0.0   # monotonic time of its last failure
    requests: int = 0
    bytes: int = 0
    failures: int = 0

    @property
    def curl_proxy(self) -> str:
        # "" switches proxies off, environment variables included.
        return "" if self.name == DIRECT else self.name


class Downloader:
    """GETs paths below *base_url* through *proxies* (CernVM-FS syntax).
    Thread-safe; `close()` when done."""

    def __init__(self, base_url: str, proxies: str = "", *, timeout: float = 15.0,
                 connect_timeout: float = CONNECT_TIMEOUT, low_speed_limit: int = LOW_SPEED_LIMIT,
                 low_speed_time: int = LOW_SPEED_TIME, backoff: float = BACKOFF,
                 max_bytes: int = MAX_BYTES):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{base_url!r} is not an http(s)://HOST/PATH URL")
        self.base_url = base_url.rstrip("/")
        self.groups = [[_Route(name) for name in group] for group in parse_proxies(proxies)]
        self._routes = {route.name: route for group in self.groups for route in group}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.low_speed_limit = low_speed_limit
        self.low_speed_time = low_speed_time
        self.backoff = backoff
        self.max_bytes = max_bytes
        self._cainfo = ssl.get_default_verify_paths().cafile if parts.scheme == "https" else None
        self._lock = threading.Lock()  # routes, counters, the handle pool
        self._handles: list[pycurl.Curl] = []
        self._closed = False
        self._flights = ThreadSingleFlight()
        self._failovers = 0
        self._unavailable = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
        for handle in handles:
            handle.close()

    # -- the interface -----------------------------------------------------------
    def url_of(self, path: str) -> str:
        return f"{self.base_url}/{urllib.parse.quote(path.lstrip('/'))}"

    def get(self, path: str, *, no_cache: bool = False, exclude: Iterable[str] = ()) -> Download:
        """The body of *path* (relative to the base URL). *no_cache* asks every
        cache on the way to refetch from the origin (after a hash mismatch);
        *exclude* names routes not to use (e.g. the proxy whose copy was bad).
        Concurrent gets of the same path with the same options share one
        transfer. Raises NotFound (404) or StoreUnavailable."""
        exclude = frozenset(exclude)
        return self._flights.run((path, no_cache, exclude), lambda: self._fetch(path, no_cache, exclude))

    def counters(self) -> dict:
        """Requests sent and bytes received (headers and bodies), failed
        attempts, failovers (a request moving on to another route), gets that
        waited on another's transfer (joined) or got no answer (unavailable);
        per route, the same and the seconds of back-off left (0: in use)."""
        now = time.monotonic()
        with self._lock:
            routes = {name: {"requests": r.requests, "bytes": r.bytes, "failures": r.failures,
                             "backoff_left": round(max(0.0, r.down_until - now), 1)}
                      for name, r in self._routes.items()}
            return {
                "requests": sum(r["requests"] for r in routes.values()),
                "bytes": sum(r["bytes"] for r in routes.values()),
                "failures": sum(r["failures"] for r in routes.values()),
                "failovers": self._failovers,
                "joined": self._flights.joined,
                "unavailable": self._unavailable,
                "routes": routes,
            }

    # -- one path ------------------------------------------------------------------
    def _plan(self, path: str, exclude: frozenset[str]) -> list[_Route]:
        """The routes to try, in order: group by group, each group starting at
        the member the path hashes to; routes in back-off after all others."""
        ordered = []
        pick = zlib.crc32(path.encode())
        for group in self.groups:
            first = pick % len(group)
            ordered += [r for r in group[first:] + group[:first] if r.name not in exclude]
        now = time.monotonic()
        with self._lock:
            up = [r for r in ordered if r.down_until <= now]
        return up + [r for r in ordered if r not in up]

    def _fetch(self, path: str, no_cache: bool, exclude: frozenset[str]) -> Download:
        url = self.url_of(path)
        deadline = time.monotonic() + self.timeout
        answers = []  # what each route tried said
        for route in self._plan(path, exclude):
            left = deadline - time.monotonic()
            if left <= 0:
                answers.append(f"{route.name}: not tried, {self.timeout:g}s spent")
                break
            if answers:
                with self._lock:
                    self._failovers += 1
            started = time.monotonic()
            try:
                data = self._transfer(route, url, no_cache, left)
            except _RouteFailed as e:
                answers.append(f"{route.name}: {e}")
                self._mark_failed(route, str(e))
                continue
            self._mark_up(route, started)
            if data is None:
                raise NotFound(f"{url}: not found (HTTP 404 via {route.name})")
            return Download(data, url, route.name)
        with self._lock:
            self._unavailable += 1
        tried = "; ".join(answers) or f"every route excluded ({', '.join(sorted(exclude))})"
        raise StoreUnavailable(f"{url}: no answer: {tried}")

    def _mark_failed(self, route: _Route, reason: str) -> None:
        with self._lock:
            now = time.monotonic()
            was_up = route.down_until <= now
            route.failures += 1
            route.failed_at = now
            route.down_until = now + self.backoff
        if was_up:
            log.warning("%s failed (%s): passed over for %gs", route.name, reason, self.backoff)

    def _mark_up(self, route: _Route, started: float) -> None:
        """A transfer that `started` before the route's last failure (in flight
        through a proxy as it died) does not bring the route back: only one
        begun after it does. Else the back-off ends at once and every request
        in flight fails over (and is warned of) again."""
        with self._lock:
            if route.failed_at >= started:
                return
            was_down = route.down_until > 0
            route.down_until = 0.0
        if was_down:
            log.info("%s answers again", route.name)

    # -- one transfer --------------------------------------------------------------
    def _take_handle(self) -> pycurl.Curl:
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"{self.base_url}: the downloader is closed")
            if self._handles:
                return self._handles.pop()
        handle = pycurl.Curl()
        handle.setopt(pycurl.NOSIGNAL, 1)  # threads: no SIGALRM for DNS timeouts
        handle.setopt(pycurl.FOLLOWLOCATION, 0)
        handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        handle.setopt(pycurl.PROXYTYPE, pycurl.PROXYTYPE_HTTP)
        handle.setopt(pycurl.TCP_KEEPALIVE, 1)
        handle.setopt(pycurl.LOW_SPEED_LIMIT, self.low_speed_limit)
        handle.setopt(pycurl.LOW_SPEED_TIME, self.low_speed_time)
        # libcurl >= 8.4 stops at the limit also when no length was announced.
        handle.setopt(pycurl.MAXFILESIZE_LARGE, self.max_bytes)
        if self._cainfo:
            handle.setopt(pycurl.CAINFO, self._cainfo)
        return handle

    def _give_back(self, handle: pycurl.Curl) -> None:
        with self._lock:
            if not self._closed:
                self._handles.append(handle)
                return
        handle.close()

    def _transfer(self, route: _Route, url: str, no_cache: bool, left: float) -> bytes | None:
        """The body (None for a 404), or _RouteFailed."""
        body = io.BytesIO()
        handle = self._take_handle()
        try:
            handle.setopt(pycurl.URL, url)
            handle.setopt(pycurl.PROXY, route.curl_proxy)
            handle.setopt(pycurl.HTTPHEADER, NO_CACHE_HEADERS if no_cache else [])
            handle.setopt(pycurl.WRITEDATA, body)
            handle.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(min(self.connect_timeout, left) * 1000)))
            handle.setopt(pycurl.TIMEOUT_MS, max(1, int(left * 1000)))
            try:
                handle.perform()
                error = None
            except pycurl.error as e:
                error = e
            status = handle.getinfo(pycurl.RESPONSE_CODE)
            wire = handle.getinfo(pycurl.HEADER_SIZE) + handle.getinfo(pycurl.SIZE_DOWNLOAD_T)
        finally:
            self._give_back(handle)
        data = body.getvalue()
        body.close()  # the pooled handle still refers to it: let it go empty
        with self._lock:
            route.requests += 1
            route.bytes += wire
        if error is not None:
            code, message = error.args
            if code == pycurl.E_FILESIZE_EXCEEDED:
                raise _RouteFailed(f"answer larger than {self.max_bytes} bytes")
            raise _RouteFailed(message or f"curl error {code}")
        if status == 200:
            return data
        if status in (404, 410):
            return None
        raise _RouteFailed(f"HTTP {status}")
