"""The benchmark's HTTP store: the generated store published as an image,
served by nginx across the network store's link, read through squid.

    server netns: nginx (the image)  <-- veth, tbf -->  client netns
                                                             ^
    root netns: rez-lazyfs --> squid --> 127.0.0.1 relay ---+   (netstore.serve_http)

* The image: `rez-lazyfs publish` of the whole generated store
  (workloads.ensure_store), once, into WORKDIR/image with the key pair
  WORKDIR/image-key(.pub); published again only when the store was
  generated again (WORKDIR/image.json remembers which store it is of).
* squid (tests/helpers/http.py) runs in the root namespace, on the client
  side of the link: a hit never crosses it, a miss crosses it as SFTP does.
  `fresh_squid()` replaces it with an empty one (a new cache directory);
  `restart_squid()` stops and starts it on its port, keeping its cache.
* Counting: `mark()` then `since(mark)` reads both access logs: what the
  clients asked squid for (requests, hits, distinct object URLs: the unique
  objects read) and what reached the origin (requests, of objects and of
  the manifest, which squid asks for again once its 61 s are over; distinct
  paths; body bytes).
* `time_publish()`: `rez-lazyfs publish` of the W1 variant alone (a copy of
  it, kept in WORKDIR like the store) into a new image, then again with
  nothing changed; page cache dropped before each; wall and CPU time.
* `probe_latency()`: one GET after another through squid with pycurl (a
  kept-alive connection, as the daemon's download manager uses), of an
  object squid holds (a hit) and of the same object with `Cache-Control:
  no-cache` (a miss: squid asks the origin across the link); what a
  launch's sequential requests cost each.
"""
from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers.http

from contenders import CLI, drop_caches  # noqa: E402
from helpers.http import SquidProxy  # noqa: E402
from workloads import W1_VARIANT  # noqa: E402

PUBLISH_TIMEOUT = 1800  # seconds: the whole store is ~2.6 GiB


def _publish(repo: Path, dest: Path, key: Path) -> dict:
    """One `rez-lazyfs publish --json`: its report, wall time and the CPU
    time (user + system) of the publishing process."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([CLI, "publish", str(repo), str(dest), "--key", str(key), "--json"],
                       capture_output=True, text=True, timeout=PUBLISH_TIMEOUT)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise RuntimeError(f"rez-lazyfs publish {repo} failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return {**json.loads(r.stdout), "wall_seconds": wall,
            "cpu_seconds": (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)}


def _keygen(key: Path) -> None:
    if not key.exists():
        subprocess.run([CLI, "keygen", str(key)], check=True, capture_output=True)


def _store_stamp(workdir: Path) -> dict:
    """What identifies the generated store (workloads.ensure_store's record)."""
    return json.loads((workdir / "store.json").read_text())["wanted"]


def ensure_image(workdir: Path, store: Path, log=print) -> tuple[Path, Path, dict]:
    """The image of `store` and its public key, published once and kept."""
    image, key = workdir / "image", workdir / "image-key"
    record = workdir / "image.json"
    stamp = _store_stamp(workdir)
    _keygen(key)
    if record.exists() and (image / "manifest").exists():
        data = json.loads(record.read_text())
        if data.get("store") == stamp:
            return image, Path(f"{key}.pub"), data["publish"]
    shutil.rmtree(image, ignore_errors=True)
    record.unlink(missing_ok=True)
    log(f"publishing the store as an image in {image} ...")
    report = _publish(store, image, key)
    log(f"  {report['files']} files, {report['objects_new']} objects in {report['wall_seconds']:.0f} s")
    record.write_text(json.dumps({"store": stamp, "publish": report}, indent=2))
    return image, Path(f"{key}.pub"), report


def time_publish(workdir: Path, store: Path, runs: int, log=print) -> dict:
    """Publish the W1 variant into a new image, then again unchanged, `runs`
    times each; page cache dropped before every publish."""
    base = workdir / "publish-w1"
    repo, record = base / "repo", base / "repo.json"
    stamp = _store_stamp(workdir)
    if not (record.exists() and json.loads(record.read_text()) == stamp):
        # a copy (not hard links: a link count changes the store files' ctime)
        shutil.rmtree(repo, ignore_errors=True)
        (repo / W1_VARIANT).parent.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(store / W1_VARIANT), str(repo / W1_VARIANT)], check=True)
        record.write_text(json.dumps(stamp))
    key = workdir / "image-key"
    _keygen(key)
    first, again = [], []
    for n in range(runs):
        dest = base / "image"
        shutil.rmtree(dest, ignore_errors=True)
        drop_caches()
        first.append(_publish(repo, dest, key))
        drop_caches()
        again.append(_publish(repo, dest, key))
        log(f"publish W1 variant {n + 1}/{runs}: {first[-1]['wall_seconds']:.1f} s "
            f"(cpu {first[-1]['cpu_seconds']:.1f} s), again unchanged {again[-1]['wall_seconds']:.1f} s "
            f"({again[-1]['files_read']} files read)")
    shutil.rmtree(base / "image", ignore_errors=True)
    return {"first": first, "again": again,
            "median_seconds": statistics.median(r["wall_seconds"] for r in first),
            "median_again_seconds": statistics.median(r["wall_seconds"] for r in again),
            "median_cpu_seconds": statistics.median(r["cpu_seconds"] for r in first),
            "files": first[0]["files"], "bytes": first[0]["bytes"],
            "objects": first[0]["objects_new"], "image_bytes": first[0]["bytes_new"]}


class ImageSide:
    """The image served across the link (netstore.serve_http) and the squid
    in front of it; which workloads squid has been filled with since it
    was made (`warmed`)."""

    def __init__(self, workdir: Path, store: Path, net, log=print):
        self.image, self.public_key, self.publish_report = ensure_image(workdir, store, log)
        self.net = net
        self.url = net.serve_http(self.image)
        self.squid: SquidProxy | None = None
        self.warmed: set[str] = set()

    @property
    def origin(self):
        return self.net.origin

    def mount_args(self) -> list[str]:
        return ["--public-key", str(self.public_key), "--proxy", self.squid.url]

    # -- squid -------------------------------------------------------------------
    def fresh_squid(self) -> None:
        self._close_squid()
        self.squid = SquidProxy()
        self.warmed.clear()

    def restart_squid(self) -> None:
        """squid's own shutdown and a start on the same port, cache kept."""
        self.squid.stop()
        self.squid.start()

    def _close_squid(self) -> None:
        if self.squid is not None:
            squid, self.squid = self.squid, None
            problems = squid.close()
            if problems:
                raise RuntimeError("; ".join(problems))

    # -- counting ----------------------------------------------------------------
    def mark(self) -> tuple[int, int]:
        return len(self.squid.log()), len(self.origin.log())

    def since(self, mark: tuple[int, int]) -> dict:
        asked = self.squid.log()[mark[0]:]
        served = self.origin.log()[mark[1]:]
        times = Counter(r.path for r in served)
        return {"proxy_requests": len(asked), "proxy_hits": sum(1 for r in asked if r.hit),
                # objects: content-addressed, immutable (catalogs and chunks); the
                # manifest is not one: it is asked again after its TTL, by design
                "unique_objects": len({r.url for r in asked if "/objects/" in r.url}),
                "origin_requests": len(served),
                "origin_object_requests": sum(1 for r in served if r.path.startswith("/objects/")),
                "origin_manifest_requests": sum(1 for r in served if r.path == "/manifest"),
                "origin_unique": len(times),
                "origin_bytes": sum(r.bytes for r in served),
                # what reached the origin more than once, and how squid answered it
                "origin_repeated": {path: {"times": n, "statuses": sorted({r.status for r in served
                                                                          if r.path == path}),
                                           "squid": sorted({r.code for r in asked if r.url.endswith(path)})}
                                    for path, n in times.most_common(10) if n > 1}}

    # -- what a request costs ------------------------------------------------------
    def probe_latency(self, requests: int = 300) -> dict:
        """Median and p90 milliseconds of sequential GETs through squid: hits,
        and misses (no-cache: squid asks the origin across the link)."""
        import pycurl

        hits = [r.url for r in self.squid.log() if r.hit and "/objects/" in r.url]
        if not hits:
            return {}
        url = hits[-1]
        handle = pycurl.Curl()
        handle.setopt(pycurl.PROXY, self.squid.url)
        handle.setopt(pycurl.WRITEFUNCTION, lambda data: None)
        out = {}
        try:
            for kind, headers, n in (("hit", [], requests), ("miss", ["Cache-Control: no-cache"],
                                                            requests // 3)):
                handle.setopt(pycurl.HTTPHEADER, headers)
                handle.setopt(pycurl.URL, url)
                handle.perform()  # the connection, once
                times = []
                for _ in range(n):
                    t = time.perf_counter()
                    handle.perform()
                    times.append(time.perf_counter() - t)
                times.sort()
                out[f"{kind}_ms_median"] = statistics.median(times) * 1000
                out[f"{kind}_ms_p90"] = times[int(len(times) * 0.9)] * 1000
        finally:
            handle.close()
        out["object"] = url.rsplit("/", 1)[-1]
        return out

    def close(self) -> None:
        self._close_squid()  # nginx and its relay: with the network store

