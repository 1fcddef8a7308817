"""Issue 11: a repository published as a signed image, mounted over HTTP through
real nginx (the origin) and real squid (the proxies), for real (FUSE, rez).

Each test publishes with the real CLI into the origin's directory and mounts
with `--repo ALIAS=URL --public-key --proxy`; the fixtures stop every server
and unmount every mount, even on failure.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.faults import lazyfs_cli_fixture
from helpers.http import nginx_origin_fixture, squid_proxy_fixture
from helpers.mounts import LAZYFS, VENV_BIN
from helpers.trees import build_tricky_tree, deterministic_bytes, write_rez_package
from helpers.walk import assert_same_tree, walk

FIXTURES = (nginx_origin_fixture, squid_proxy_fixture, lazyfs_cli_fixture)
KiB = 1024


def cli(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(LAZYFS), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, f"{args[0]} exited {result.returncode}: {result.stderr}"
    return result


class Image:
    """A published image of `store`, served by an nginx origin."""

    def __init__(self, tmp_path: Path, store: Path, origin, ttl: int = 61):
        self.store, self.origin, self.ttl = store, origin, ttl
        self.key = tmp_path / "signing.key"
        cli("keygen", self.key)
        self.public_key = Path(str(self.key) + ".pub")
        self.publish()

    @property
    def dest(self) -> Path:
        return Path(self.origin.root)

    def publish(self, store: Path | None = None) -> dict:
        result = cli("publish", store or self.store, self.dest, "--key", self.key,
                     "--ttl", self.ttl, "--json")
        self.origin.reload()  # nginx keeps files open: serve what was just written
        return json.loads(result.stdout)

    def objects(self) -> set[str]:
        return {p.name for p in (self.dest / "objects").rglob("*") if p.is_file()}

    def mount(self, lazyfs_mount, *, proxy: str = "", cache: Path | None = None,
              extra_args: tuple[str, ...] = (), **options):
        extra = ("--public-key", str(self.public_key)) + (("--proxy", proxy) if proxy else ())
        return lazyfs_mount({"main": self.origin.url}, cache=cache, extra_args=extra + extra_args,
                            **options)


@pytest.fixture
def origin(nginx_origin):
    return nginx_origin()


# 1. -----------------------------------------------------------------------------
def test_http_mount_is_the_store_byte_for_byte(tmp_path, origin, squid_proxy, lazyfs_mount):
    store = tmp_path / "store"
    tree = build_tricky_tree(store, crowded_entries=2_000)
    image = Image(tmp_path, store, origin)
    proxy = squid_proxy()
    m = image.mount(lazyfs_mount, proxy=proxy.url)
    expected, served = walk(store), walk(m.repo_path("main"))
    assert len(expected) > 2_000 and tree.symlinks
    assert_same_tree(expected, served)
    stats = m.stats()
    assert stats["store_reads"] > 0 and stats["cache_misses"] > 0


def test_rez_env_resolves_and_runs_from_an_http_mount_and_a_baked_context_sources_offline(
        tmp_path, origin, lazyfs_mount):
    store = tmp_path / "store"
    hello = '#!/bin/sh\necho "hello {version}"\necho "root=$REZ_HELLO_ROOT"\n'
    for version in ("0.9.0", "1.0.0"):
        write_rez_package(store, "hello", version, commands='env.PATH.prepend("{root}/bin")',
                          files={"bin/hello": hello.format(version=version),
                                 "data/blob.bin": deterministic_bytes(300 * KiB, seed=3)},
                          executables=("bin/hello",))
    image = Image(tmp_path, store, origin)
    cache = tmp_path / "cache"
    m = image.mount(lazyfs_mount, cache=cache)
    repo = m.repo_path("main")
    env = rez_env(tmp_path, repo)
    ctx = tmp_path / "hello.rxt"
    run([VENV_BIN / "rez-env", "--norc", "hello", "--output", ctx], env=env)
    out = run([VENV_BIN / "rez-env", "--norc", "--input", ctx, "--", "hello"], env=env).stdout
    assert out.splitlines() == ["hello 1.0.0", f"root={repo / 'hello' / '1.0.0'}"]

    baked = tmp_path / "hello.lazy.rxt"
    settings = ("--mount", m.path, "--repo", f"main={origin.url}",
                "--public-key", image.public_key, "--cache", cache)
    cli("bake", ctx, "-o", baked, *settings)
    cli("populate", baked, "--cache", cache, "--repo", f"main={origin.url}",
        "--public-key", image.public_key)
    m.unmount()
    origin.stop()  # no store from here on
    m.remount(offline=True)
    out = run([VENV_BIN / "rez-env", "--norc", "--input", baked, "--", "hello"], env=env).stdout
    assert out.splitlines() == ["hello 1.0.0", f"root={repo / 'hello' / '1.0.0'}"]
    blob = (repo / "hello/1.0.0/data/blob.bin").read_bytes()
    assert blob == deterministic_bytes(300 * KiB, seed=3)


def rez_env(tmp_path: Path, repo: Path) -> dict:
    home = tmp_path / "rez-home"
    home.mkdir(exist_ok=True)
    config = tmp_path / "rezconfig.py"
    config.write_text(f"local_packages_path = {str(home / 'packages')!r}\n"
                      f"release_packages_path = {str(home / 'release')!r}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_")}
    env.update(HOME=str(home), REZ_CONFIG_FILE=str(config), REZ_DISABLE_HOME_CONFIG="1",
               REZ_PACKAGES_PATH=str(repo))
    return env


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                            **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}: {result.stderr}"
    return result


# 2. -----------------------------------------------------------------------------
def test_republishing_a_mostly_equal_version_uploads_only_its_new_objects(tmp_path, origin,
                                                                          lazyfs_mount):
    store = tmp_path / "store"
    files = {f"lib/mod{i:02d}.py": deterministic_bytes(20 * KiB + i, seed=i) for i in range(20)}
    write_rez_package(store, "daily", "1.0", files=files)
    image = Image(tmp_path, store, origin, ttl=1)
    m = image.mount(lazyfs_mount, metadata_ttl=1)
    assert sorted(os.listdir(m.repo_path("main") / "daily")) == ["1.0"]

    before = image.objects()
    shutil.copytree(store / "daily/1.0", store / "daily/1.1", symlinks=True)
    (store / "daily/1.1/package.py").write_text("name = 'daily'\nversion = '1.1'\n")
    changed = deterministic_bytes(20 * KiB, seed=99)
    (store / "daily/1.1/lib/mod07.py").write_bytes(changed)
    report = image.publish()
    added = image.objects() - before
    # New: the changed module and package.py (one chunk each), the new
    # version's payload catalog, the family catalog and the root catalog.
    assert len(added) == 5, (len(added), report)
    assert report["objects_new"] == 5

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "1.1" in os.listdir(m.repo_path("main") / "daily"):
            break
        time.sleep(0.2)
    assert sorted(os.listdir(m.repo_path("main") / "daily")) == ["1.0", "1.1"]
    assert (m.repo_path("main") / "daily/1.1/lib/mod07.py").read_bytes() == changed
    assert (m.repo_path("main") / "daily/1.1/lib/mod03.py").read_bytes() == files["lib/mod03.py"]


# 3. -----------------------------------------------------------------------------
def test_a_tampered_object_is_never_served(tmp_path, origin, squid_proxy, lazyfs_mount):
    store = tmp_path / "store"
    good = deterministic_bytes(200 * KiB, seed=5)
    write_rez_package(store, "pkg", "1.0", files={"bin/tool": good})
    image = Image(tmp_path, store, origin)
    chunk = _chunk_of(image, good[:128 * KiB])
    path = f"objects/{chunk[:2]}/{chunk}"
    blob = (image.dest / path).read_bytes()
    origin.put(path, blob[:-1] + bytes([blob[-1] ^ 0xFF]))  # same name, other bytes
    proxy = squid_proxy()
    m = image.mount(lazyfs_mount, proxy=proxy.url)
    m.expect_log("does not match its name")
    m.expect_log("kept failing verification")
    m.expect_log("EIO")
    with pytest.raises(OSError) as raised:
        (m.repo_path("main") / "pkg/1.0/bin/tool").read_bytes()
    assert raised.value.errno == 5
    logged = b"\n".join(m.log_lines())
    assert os.fsencode(path) in logged and os.fsencode(proxy.url) in logged
    # Mended on the origin: served again, right, with no remount.
    origin.put(path, blob)
    m.expect_log("no answer")  # the fetcher may have marked the store silent meanwhile
    deadline = time.monotonic() + 20
    while True:
        try:
            assert (m.repo_path("main") / "pkg/1.0/bin/tool").read_bytes() == good
            break
        except OSError:
            assert time.monotonic() < deadline, "not served again after the origin was mended"
            time.sleep(0.5)


def _chunk_of(image: Image, data: bytes) -> str:
    from cachecore.image.objects import object_name

    name = object_name(data)
    assert (image.dest / "objects" / name[:2] / name).exists()
    return name


def test_bad_manifests_are_refused_with_one_line(tmp_path, origin, lazyfs_cli):
    store = tmp_path / "store"
    write_rez_package(store, "pkg", "1.0", files={"f": "x"})
    image = Image(tmp_path, store, origin)
    mp = tmp_path / "mnt"
    mp.mkdir()

    def mount(cache: Path, key: Path = image.public_key):
        return lazyfs_cli.run("mount", mp, "--repo", f"main={origin.url}", "--public-key", key,
                              "--cache", cache, "--store-timeout", "5")

    # Another key's public half: the signature does not verify.
    other = tmp_path / "other.key"
    cli("keygen", other)
    line = mount(tmp_path / "c1", Path(str(other) + ".pub")).one_line_error()
    assert "signature does not verify" in line

    # A byte of the signed body changed on the origin.
    manifest = (image.dest / "manifest").read_bytes()
    origin.put("manifest", manifest.replace(b'"ttl":61', b'"ttl":62'))
    line = mount(tmp_path / "c2").one_line_error()
    assert "signature does not verify" in line

    # A lower revision than one this cache saw.
    origin.put("manifest", manifest)
    image.publish()  # revision 2
    first = mount(tmp_path / "c3")
    assert first.returncode == 0 and first.mounted, first.output
    assert (mp / "main/pkg/1.0/f").read_text() == "x"
    cli("umount", mp)
    origin.put("manifest", manifest)  # revision 1 again: a replay
    line = mount(tmp_path / "c3").one_line_error()
    assert "older than revision 2" in line

    # Past its expiry.
    cli("publish", store, image.dest, "--key", image.key, "--valid-for", "1s")
    origin.reload()
    time.sleep(2.1)
    line = mount(tmp_path / "c4").one_line_error()
    assert "expired" in line


# 4. -----------------------------------------------------------------------------
def test_two_caches_one_squid_failover_and_outage(tmp_path, origin, squid_proxy, lazyfs_mount):
    store = tmp_path / "store"
    files = {f"share/f{i:02d}.bin": deterministic_bytes(50 * KiB + i, seed=100 + i) for i in range(40)}
    write_rez_package(store, "pkg", "1.0", files=files)
    image = Image(tmp_path, store, origin)
    first, second = squid_proxy(), squid_proxy()
    proxies = f"{first.url};{second.url}"
    nodes = [image.mount(lazyfs_mount, proxy=proxies, store_timeout=6) for _ in range(2)]
    for node in nodes:
        for rel, data in list(files.items())[:20]:
            assert (node.repo_path("main") / "pkg/1.0" / rel).read_bytes() == data
    served = origin.requests("/objects/")
    assert len(served) == len(set(served)), "the origin served an object twice"

    # The first proxy dies mid-run: each read moves on within 5 s.
    for node in nodes:
        node.expect_log(first.url)
    first.kill()
    for rel, data in list(files.items())[20:30]:
        started = time.monotonic()
        assert (nodes[0].repo_path("main") / "pkg/1.0" / rel).read_bytes() == data
        assert time.monotonic() - started < 5

    traffic = json.loads(os.getxattr(nodes[0].path, "user.rezlazyfs.stats"))["stores"]["main"]
    assert traffic["failovers"] >= 1 and traffic["requests"] > 0
    assert traffic["routes"][second.url]["requests"] > 0 and traffic["routes"][first.url]["failures"] >= 1
    shown = cli("stats", "--cache", nodes[0].cache).stdout
    assert "HTTP requests" in shown and second.url in shown

    # Origin and proxies down: cached reads work, others fail within the bound.
    second.kill()
    origin.stop()
    for node in nodes:
        node.expect_log("EIO")
        node.expect_log(second.url)
    assert (nodes[1].repo_path("main") / "pkg/1.0/share/f00.bin").read_bytes() == files["share/f00.bin"]
    started = time.monotonic()
    with pytest.raises(OSError):
        (nodes[1].repo_path("main") / "pkg/1.0/share/f35.bin").read_bytes()
    assert time.monotonic() - started < 6 + 3

    # Back again: reads succeed with no remount.
    origin.start()
    second.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert (nodes[1].repo_path("main") / "pkg/1.0/share/f35.bin").read_bytes() == files["share/f35.bin"]
            break
        except OSError:
            assert time.monotonic() < deadline, "not served again after the servers came back"
            time.sleep(0.5)


def test_an_exported_http_context_runs_with_no_network(tmp_path, origin, lazyfs_mount, lazyfs_cli):
    store = tmp_path / "store"
    write_rez_package(store, "hello", "2.0", commands='env.PATH.prepend("{root}/bin")',
                      files={"bin/hello": '#!/bin/sh\necho "hello from $REZ_HELLO_ROOT"\n'},
                      executables=("bin/hello",))
    image = Image(tmp_path, store, origin)
    m = image.mount(lazyfs_mount)
    env = rez_env(tmp_path, m.repo_path("main"))
    ctx = tmp_path / "hello.rxt"
    run([VENV_BIN / "rez-env", "--norc", "hello", "--output", ctx], env=env)
    bundle = tmp_path / "bundle"
    cli("export", ctx, bundle, "--mount", m.path, "--repo", f"main={origin.url}",
        "--public-key", image.public_key)
    m.unmount()
    origin.stop()
    mounted = lazyfs_cli.run("mount", m.path, "--config", bundle / "rez-lazyfs.toml")
    assert mounted.returncode == 0 and mounted.mounted, mounted.output
    out = run([VENV_BIN / "rez-env", "--norc", "--input", bundle / "context.rxt", "--", "hello"],
              env=env).stdout
    assert out.strip() == f"hello from {m.repo_path('main') / 'hello' / '2.0'}"
    cli("umount", m.path)


def test_status_clean_and_a_shared_cache_work_for_an_image(tmp_path, origin, lazyfs_mount):
    store = tmp_path / "store"
    files = {f"lib/m{i}.py": deterministic_bytes(70 * KiB + i, seed=200 + i) for i in range(5)}
    write_rez_package(store, "pkg", "3.0", files=files)
    image = Image(tmp_path, store, origin)
    host_cache = tmp_path / "host-cache"
    host = image.mount(lazyfs_mount, cache=host_cache)
    for rel, data in files.items():
        assert (host.repo_path("main") / "pkg/3.0" / rel).read_bytes() == data
    host.unmount()
    status = json.loads(cli("status", "--cache", host_cache, "--json").stdout)
    row = next(v for v in status["variants"] if v["package"] == "pkg")
    assert row["version"] == "3.0" and row["files_cached"] == len(files)
    assert row["store_path"].startswith(origin.url)

    # A container's private cache over the host's: nothing fetched again.
    container = image.mount(lazyfs_mount, cache=tmp_path / "private",
                            extra_args=("--shared-cache", str(host_cache)))
    before = len(origin.requests("/objects/"))
    for rel, data in files.items():
        assert (container.repo_path("main") / "pkg/3.0" / rel).read_bytes() == data
    assert container.stats()["store_reads"] == 0
    assert len(origin.requests("/objects/")) == before
    container.unmount()

    cleaned = json.loads(cli("clean", "--cache", host_cache, "--max-size", "0", "--json").stdout)
    assert cleaned["evicted_files"] >= len(files) and cleaned["size_after"] == 0
