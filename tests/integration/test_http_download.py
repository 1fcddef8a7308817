"""Issue 11, the HTTP store's download manager (cachecore/stores/download.py)
against real servers: nginx as the origin, squid as the proxies
(tests/helpers/http.py). Each test plays the fault (a proxy killed, hung,
answering 503, everything down, a tampered cache) and asserts what the
issue asks: failover within 5 s, time bounds, recovery without a new
downloader, one origin fetch per object, definitive 404s. Rows go to the
fault report.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from pathlib import Path

import pytest

from cachecore.errors import NotFound, StoreUnavailable
from cachecore.stores.download import DIRECT, Downloader, parse_proxies
from helpers.faults import report_fixture
from helpers.http import NginxOrigin, SquidProxy, processes_in_group, nginx_origin_fixture, squid_proxy_fixture
from helpers.trees import deterministic_bytes

FIXTURES = (report_fixture, nginx_origin_fixture, squid_proxy_fixture)
AREAS = {"test_": "HTTP download"}
FAILOVER_BOUND = 5.0  # seconds a dead or hung proxy may cost a request (issue 11)


def put_objects(origin, count: int, size: int = 4096, prefix: str = "o") -> dict[str, bytes]:
    objects = {}
    for n in range(count):
        path = f"objects/{n % 16:02x}/{prefix}{n:05d}"
        objects[path] = deterministic_bytes(size, seed=zlib.crc32(path.encode()))
        origin.put(path, objects[path])
    return objects


def timed_get(dl: Downloader, path: str, **kw):
    start = time.monotonic()
    result = dl.get(path, **kw)
    return result, time.monotonic() - start


def run_threads(n: int, target) -> list:
    """Run target(i) in n threads started together; their results, in order."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def body(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as e:  # noqa: BLE001 - handed to the test as a value
            results[i] = e

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a get never returned"
    return results


def test_two_clients_through_one_squid_reach_the_origin_once(nginx_origin, squid_proxy, report):
    origin, squid = nginx_origin(), squid_proxy()
    objects = put_objects(origin, 20)
    with Downloader(origin.url, squid.url) as first, Downloader(origin.url, squid.url) as second:
        for client in (first, second):
            for path, data in objects.items():
                got = client.get(path)
                assert got.data == data and got.via == squid.url
        served = origin.requests()
        assert sorted(served) == sorted(f"/{p}" for p in objects), served
        second_answers = squid.requests()[len(objects):]
        assert len(second_answers) == len(objects) and all(r.hit for r in second_answers), second_answers
        counters = first.counters()
        assert counters["routes"][squid.url]["requests"] == len(objects)
        assert counters["routes"][squid.url]["bytes"] > len(objects) * 4096
    report.row("two clients GET the same 20 objects through one squid",
               f"origin served {len(served)} requests (each object once); the second client's "
               f"{len(second_answers)} GETs were squid hits ({second_answers[0].code})")


def test_single_flight_one_transfer_for_20_threads(nginx_origin, report):
    origin = nginx_origin()
    data = deterministic_bytes(1 << 20, seed=3)
    origin.put("objects/aa/big", data)
    with Downloader(origin.url, DIRECT) as dl:
        origin.freeze()  # the first GET waits in nginx's backlog while the others arrive
        try:
            threads = []
            results: list = [None] * 20
            for i in range(20):
                threads.append(threading.Thread(target=lambda i=i: results.__setitem__(i, dl.get("objects/aa/big"))))
                threads[-1].start()
            time.sleep(1.0)
        finally:
            origin.thaw()
        for t in threads:
            t.join(timeout=30)
        assert all(r is not None and r.data == data for r in results)
        counters = dl.counters()
    served = origin.requests()
    assert served == ["/objects/aa/big"], served
    assert counters["requests"] == 1 and counters["joined"] == 19, counters
    report.row("20 threads of one downloader GET one uncached 1 MiB object at once (DIRECT)",
               f"one transfer: origin served {len(served)} request, downloader made "
               f"{counters['requests']} request, {counters['joined']} gets waited on it, all bytes equal")


def test_single_flight_waiters_get_their_own_error(nginx_origin, report):
    origin = nginx_origin()
    with Downloader(origin.url, DIRECT) as dl:
        origin.freeze()
        try:
            results: list = [None] * 10
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _error_of(dl.get, "objects/ff/no")))
                       for i in range(10)]
            for t in threads:
                t.start()
            time.sleep(1.0)
        finally:
            origin.thaw()
        for t in threads:
            t.join(timeout=30)
        counters = dl.counters()
    assert all(isinstance(e, NotFound) for e in results), results
    assert len({id(e) for e in results}) == 10  # a copy each: no shared traceback
    assert len({str(e) for e in results}) == 1
    assert origin.requests() == ["/objects/ff/no"] and counters["joined"] == 9, counters
    report.row("10 threads GET one missing object at once (origin frozen until all wait)",
               f"one origin request; each thread got its own NotFound: {results[0]}")


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    return None


def test_collapsed_forwarding_20_clients_one_origin_fetch(nginx_origin, squid_proxy, report):
    origin, squid = nginx_origin(), squid_proxy()
    data = deterministic_bytes(8 << 20, seed=4)
    origin.put("objects/bb/big", data)
    clients = [Downloader(origin.url, squid.url) for _ in range(20)]
    try:
        origin.freeze()  # squid's fetch waits while the 20 requests reach squid
        try:
            threads, results = [], [None] * 20
            for i, dl in enumerate(clients):
                threads.append(threading.Thread(
                    target=lambda i=i, dl=dl: results.__setitem__(i, dl.get("objects/bb/big"))))
                threads[-1].start()
            time.sleep(1.0)
        finally:
            origin.thaw()
        for t in threads:
            t.join(timeout=30)
    finally:
        for dl in clients:
            dl.close()
    assert all(r is not None and r.data == data for r in results)
    served = origin.requests()
    answers = squid.requests()
    assert served == ["/objects/bb/big"], served
    assert len(answers) == 20, answers
    report.row("20 separate clients GET one uncached 8 MiB object through squid at once",
               f"origin served {len(served)} request (collapsed forwarding); squid answered "
               f"{len(answers)}: {sorted({r.code for r in answers})}")


def test_squid_killed_mid_run_fails_over_to_the_next_group(nginx_origin, squid_proxy, report, caplog):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 160)
    paths = list(objects)
    gets: list[tuple[float, float, str]] = []  # (started, took, via) of every get
    killed_at: list[float] = []
    with Downloader(origin.url, f"{first.url};{second.url}") as dl:
        def fetch_share(i):
            for n, path in enumerate(paths[i::8]):
                if i == 0 and n == 5:
                    first.kill()
                    killed_at.append(time.monotonic())
                started = time.monotonic()
                got, took = timed_get(dl, path)
                assert got.data == objects[path]
                gets.append((started, took, got.via))

        with caplog.at_level(logging.WARNING, logger="cachecore.stores.download"):
            errors = [e for e in run_threads(8, fetch_share) if e is not None]
        assert not errors, errors
        counters = dl.counters()
    slowest = max(took for _, took, _ in gets)
    before = [via for started, _, via in gets if started < killed_at[0]]
    after = [via for started, _, via in gets if started > killed_at[0]]
    assert len(gets) == len(paths)
    assert first.url in before, before  # the first group served until the kill
    assert slowest < FAILOVER_BOUND, slowest
    assert set(after) == {second.url}, set(after)
    assert counters["routes"][first.url]["failures"] >= 1 and counters["failovers"] >= 1, counters
    warned = [r.getMessage() for r in caplog.records if first.url in r.getMessage()]
    assert len(warned) == 1, warned  # once when it failed, not once per request
    report.row("8 threads GET 160 objects through 'squid1;squid2'; squid1 SIGKILLed after a few",
               f"all 160 GETs correct; slowest {slowest:.2f}s; {before.count(first.url)} via squid1 "
               f"before the kill, all {len(after)} started after it via squid2; squid1 failures "
               f"{counters['routes'][first.url]['failures']}, failovers {counters['failovers']}; "
               f"one warning: {warned[0]}")


def test_hung_proxy_fails_over_within_5s(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 3)
    paths = list(objects)
    with Downloader(origin.url, f"{first.url};{second.url}") as dl:
        assert dl.get(paths[0]).via == first.url  # a kept-alive connection to it now
        first.freeze()  # SIGSTOP: connections stay open, nothing answers
        got, took = timed_get(dl, paths[1])
        then, took_next = timed_get(dl, paths[2])
        counters = dl.counters()
    assert got.data == objects[paths[1]] and got.via == second.url
    assert took < FAILOVER_BOUND, took
    assert then.via == second.url and took_next < 1.0, took_next  # passed over now
    assert counters["routes"][first.url]["failures"] == 1, counters
    report.row("the first proxy is SIGSTOPped (accepts, never answers) with a kept-alive connection",
               f"GET served by the second group after {took:.2f}s (low-speed limit); the next GET went "
               f"straight to it ({took_next * 1000:.0f} ms)")


def test_proxy_answering_503_counts_as_failed(nginx_origin, squid_proxy, report):
    origin = nginx_origin()
    dead_parent = squid_proxy()
    orphan = squid_proxy(parent=dead_parent)  # answers 503: its parent is gone
    working = squid_proxy()
    dead_parent.kill()
    objects = put_objects(origin, 2)
    paths = list(objects)
    with Downloader(origin.url, f"{orphan.url};{working.url}") as dl:
        got = dl.get(paths[0])
        then = dl.get(paths[1])
        counters = dl.counters()
    orphan_answers = orphan.requests()
    assert got.data == objects[paths[0]] and got.via == working.url
    assert [r.status for r in orphan_answers] == [503], orphan_answers
    assert then.via == working.url  # in back-off: not asked again
    assert counters["routes"][orphan.url]["failures"] == 1 and counters["failovers"] == 1, counters
    report.row("the first proxy answers 503 (squid whose parent proxy is dead)",
               f"treated as a failed proxy: served via the second ({got.via}); the 503 proxy saw "
               f"{len(orphan_answers)} request, none after (back-off)")


def test_everything_down_is_unavailable_within_the_timeout(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 4)
    paths = list(objects)
    timeout = 4.0
    with Downloader(origin.url, f"{first.url};{second.url}", timeout=timeout, backoff=1.0) as dl:
        assert dl.get(paths[0]).data == objects[paths[0]]
        # Hung, not refused: each proxy would take the low-speed limit (3 s),
        # two of them more than the timeout.
        first.freeze()
        second.freeze()
        origin.stop()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as hung:
            dl.get(paths[1])
        took_hung = time.monotonic() - start
        first.thaw()
        second.thaw()
        first.kill()
        second.kill()
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as refused:
            dl.get(paths[1])
        took_refused = time.monotonic() - start

        origin.start()
        first.start()
        second.start()
        time.sleep(1.0)  # the back-off
        got = dl.get(paths[1])
        counters = dl.counters()
    message = str(hung.value)
    assert took_hung < timeout + 1.0, took_hung
    assert dl.url_of(paths[1]) in message and first.url in message and second.url in message, message
    assert took_refused < timeout and first.url in str(refused.value) and second.url in str(refused.value)
    assert got.data == objects[paths[1]] and got.via == first.url
    assert counters["unavailable"] == 2, counters
    report.row("origin and both proxies down (hung, then refused); timeout 4 s",
               f"StoreUnavailable after {took_hung:.2f}s (hung) and {took_refused:.2f}s (refused): "
               f"{message}; all brought back: the same downloader got the object via the first proxy")


def test_failed_proxy_is_retried_after_the_backoff(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 4)
    paths = list(objects)
    backoff = 2.0
    with Downloader(origin.url, f"{first.url};{second.url}", backoff=backoff) as dl:
        first.kill()
        assert dl.get(paths[0]).via == second.url
        first.start()
        during = dl.get(paths[1]).via
        time.sleep(backoff + 0.2)
        after = dl.get(paths[2]).via
    assert during == second.url  # passed over while in back-off
    assert after == first.url  # tried again, and first again
    assert [r.url.rsplit("/", 1)[1] for r in first.requests()] == [paths[2].rsplit("/", 1)[1]]
    report.row(f"first proxy killed, restarted at once; back-off {backoff:g}s",
               f"during the back-off: via {during} (second); after: via {after} (first again), "
               "no remount, no new downloader")


def test_no_direct_fallback_unless_written(nginx_origin, squid_proxy, report):
    origin, squid = nginx_origin(), squid_proxy()
    objects = put_objects(origin, 2)
    paths = list(objects)
    squid.kill()
    with Downloader(origin.url, squid.url, timeout=3) as only_proxy:
        with pytest.raises(StoreUnavailable) as refused:
            only_proxy.get(paths[0])
    assert origin.requests() == []
    with Downloader(origin.url, f"{squid.url};{DIRECT}") as with_direct:
        got = with_direct.get(paths[1])
    assert got.via == DIRECT and got.data == objects[paths[1]]
    assert origin.requests() == [f"/{paths[1]}"]
    report.row("the only proxy is dead; DIRECT not listed, then listed last",
               f"not listed: StoreUnavailable, origin saw no request ({refused.value}); listed: served "
               f"{got.via}")


def test_no_cache_makes_the_origin_serve_again(nginx_origin, squid_proxy, report):
    origin, squid = nginx_origin(), squid_proxy()
    path = "objects/cc/obj"
    good = deterministic_bytes(4096, seed=5)
    origin.put(path, good)
    with Downloader(origin.url, squid.url) as dl:
        assert dl.get(path).data == good
        origin.put(path, b"replaced on the origin")  # squid still holds the first bytes
        cached = dl.get(path).data
        refetched = dl.get(path, no_cache=True).data
    served = origin.requests()
    answers = squid.requests()
    assert cached == good and answers[1].hit
    assert refetched == b"replaced on the origin" and not answers[2].hit, answers
    assert served == [f"/{path}", f"/{path}"], served
    report.row("GET, the origin's copy replaced, GET, then GET with no_cache",
               f"second GET a squid hit ({answers[1].code}, old bytes); no_cache: {answers[2].code}, "
               f"origin served it again ({len(served)} origin requests), new bytes")


def test_exclude_asks_the_next_proxy(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 1)
    path = next(iter(objects))
    with Downloader(origin.url, f"{first.url};{second.url}") as dl:
        bad_copy = dl.get(path)
        retried = dl.get(path, no_cache=True, exclude={bad_copy.via})
        with pytest.raises(StoreUnavailable) as none_left:
            dl.get(path, exclude={first.url, second.url})
        counters = dl.counters()
    assert bad_copy.via == first.url and retried.via == second.url
    assert len(first.requests()) == 1 and len(second.requests()) == 1
    assert "every route excluded" in str(none_left.value)
    assert counters["routes"][first.url]["failures"] == 0  # excluding is not failing
    report.row("GET, then the same path again excluding the proxy that served it (a bad copy), then "
               "excluding both", f"second GET via {retried.via} (first not asked again); both excluded: "
               f"{none_left.value}")


def test_404_is_not_found_not_a_failover(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 1)
    with Downloader(origin.url, f"{first.url};{second.url}") as dl:
        with pytest.raises(NotFound) as missing:
            dl.get("objects/dd/missing")
        assert dl.get(next(iter(objects))).via == first.url  # not marked failed
        counters = dl.counters()
    with Downloader(origin.url, DIRECT) as direct:
        with pytest.raises(NotFound):
            direct.get("objects/dd/missing")
    assert counters["failovers"] == 0 and counters["routes"][second.url]["requests"] == 0, counters
    assert second.requests("") == []
    report.row("GET of an object the origin does not have, through 'squid1;squid2', and DIRECT",
               f"NotFound ({missing.value}); no failover, squid2 never asked, squid1 kept")


def test_oversized_answer_is_refused(nginx_origin, report):
    origin = nginx_origin()
    origin.put("objects/ee/big", deterministic_bytes(64 * 1024, seed=6))
    with Downloader(origin.url, DIRECT, max_bytes=4096) as dl:
        with pytest.raises(StoreUnavailable) as refused:
            dl.get("objects/ee/big")
    assert "larger than 4096 bytes" in str(refused.value)
    report.row("an answer of 64 KiB where at most 4 KiB are accepted", f"refused: {refused.value}")


def test_servers_leave_nothing_behind(report):
    origin = NginxOrigin()
    parent = SquidProxy()
    child = SquidProxy(parent=parent)
    groups = {"nginx": origin._proc.pid, "squid": parent._proc.pid, "child squid": child._proc.pid}
    segments = sorted(p.name for p in Path("/dev/shm").glob(f"{parent.name}-*"))
    parent.kill()  # SIGKILL: squid cannot remove its shared memory itself
    work_dirs = [s.work for s in (origin, parent, child)]
    problems = child.close() + parent.close() + origin.close()
    left = {name: processes_in_group(pgid) for name, pgid in groups.items() if processes_in_group(pgid)}
    assert not problems and not left, (problems, left)
    assert segments and not list(Path("/dev/shm").glob(f"{parent.name}-*")), segments
    assert not any(d.exists() for d in work_dirs)
    report.row("nginx, a squid and its child squid started, the parent SIGKILLed, then closed",
               f"no process left in their process groups; squid's /dev/shm segments ({len(segments)}) "
               "and the work directories removed")


@pytest.mark.parametrize("spec, problem", [
    ("http://p1:3128||http://p2:3128", "an empty entry"),
    ("http://p1:3128;", "an empty entry"),
    ("p1:3128", "neither http://HOST:PORT nor DIRECT"),
    ("http://p1", "neither http://HOST:PORT nor DIRECT"),
    ("https://p1:3128", "neither http://HOST:PORT nor DIRECT"),
    ("http://p1:99999", "neither http://HOST:PORT nor DIRECT"),
    ("http://user:pw@p1:3128", "neither http://HOST:PORT nor DIRECT"),
    ("http://p1:3128/path", "neither http://HOST:PORT nor DIRECT"),
    ("direct", "neither http://HOST:PORT nor DIRECT"),
    ("http://p1:3128|http://p1:3128", "listed twice"),
])
def test_malformed_proxy_list_is_a_clear_error(spec, problem, report):
    with pytest.raises(ValueError) as bad:
        Downloader("http://origin.example/repo", spec)
    assert problem in str(bad.value) and repr(spec) in str(bad.value), bad.value
    report.row(f"--proxy {spec!r}", f"ValueError: {bad.value}", area="bad input")


def test_proxy_lists_parse_into_groups(report):
    cases = {
        "http://p1:3128|http://p2:3128;http://p3:3128": [["http://p1:3128", "http://p2:3128"],
                                                         ["http://p3:3128"]],
        " http://p1:3128 ; DIRECT ": [["http://p1:3128"], [DIRECT]],
        "": [[DIRECT]],
        "http://[::1]:3128": [["http://[::1]:3128"]],
    }
    for spec, groups in cases.items():
        assert parse_proxies(spec) == groups, spec
    report.row("proxy lists with groups, spaces, DIRECT, IPv6, empty", "parsed as written",
               area="bad input")


def test_a_group_shares_the_load_one_proxy_per_object(nginx_origin, squid_proxy, report):
    origin, first, second = nginx_origin(), squid_proxy(), squid_proxy()
    objects = put_objects(origin, 32)
    with Downloader(origin.url, f"{first.url}|{second.url}") as dl:
        vias = {path: dl.get(path).via for path in objects}
        again = {path: dl.get(path).via for path in objects}
    per_proxy = {url: list(vias.values()).count(url) for url in (first.url, second.url)}
    assert again == vias  # the same proxy for the same object: cached once per group
    assert min(per_proxy.values()) >= 4, per_proxy
    assert all(r.hit for r in first.requests()[per_proxy[first.url]:] + second.requests()[per_proxy[second.url]:])
    assert sorted(origin.requests()) == sorted(f"/{p}" for p in objects)
    report.row("32 objects, twice, through one group 'squid1|squid2'",
               f"split {per_proxy[first.url]}/{per_proxy[second.url]}; each object always via the "
               f"same proxy (second round all hits); origin served each once")
