"""Baked contexts as untrusted input (issue 15, findings 3, 4, 7 (bake), 13, 14).

A baked .rxt is a file anyone can write, and someone else may seed or
populate it (a render node seeding the contexts its users submit). Each test
edits a real baked context (resolved by the real rez, baked by the real
CLI) the way an attacker would, runs the real `rez-lazyfs` on it, and checks
the safe outcome: only what bake embeds gets into the cache, the store
outranks the file when it answers, nothing outside the store is read,
malformed sections are refused before anything is written, pins end with
their context file, and a bake that embeds private listings is not
world-readable. Rows go to the fault report (tests/helpers/faults.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from cachecore.cache import LocalCache, RepoSpec
from cachecore.clean import HOLDER_TIMEOUT
from cachecore.model import Attr, decode_listing, encode_listing
from helpers.faults import fault_store_fixture, lazyfs_cli_fixture, report_fixture
from helpers.rezrepo import Rez, build_store
from helpers.trees import KiB, deterministic_bytes, write_file
from helpers.users import public_tmp_fixture, throwaway_user_fixture

# pytest finds these fixtures here (report is autouse).
FIXTURES = (report_fixture, lazyfs_cli_fixture, fault_store_fixture, throwaway_user_fixture,
            public_tmp_fixture)

AREAS = {
    "test_embedded": "trust: what a baked context may put in the cache (finding 3)",
    "test_escaping": "trust: paths from a baked context (finding 4)",
    "test_private": "permissions: baked contexts (finding 7)",
    "test_malformed": "bad input: malformed baked sections (finding 13)",
    "test_deep": "bad input: malformed baked sections (finding 13)",
    "test_pins": "liveness: pins of baked contexts (finding 14)",
}

ALIAS = "main"
SECTION = "rez_lazyfs"
ERROR_PREFIX = "rez-lazyfs: error: "
# What the contexts resolve from: tools-1.0 (what the baked context uses; a
# script on its PATH and a multi-block file), an older tools and another
# family it does not use.
STORE = {
    "tools/1.0/package.py": """
        name = "tools"
        version = "1.0"
        def commands():
            env.PATH.prepend("{root}/bin")
    """,
    "tools/1.0/bin/tool": """
        #!/bin/sh
        echo "the store's tool"
    """,
    "tools/1.0/share/data.bin": deterministic_bytes(3 * 128 * KiB + 5, seed=15),
    "tools/0.9/package.py": """
        name = "tools"
        version = "0.9"
    """,
    "tools/0.9/bin/tool": """
        #!/bin/sh
        echo "the old tool"
    """,
    "other/2.0/package.py": """
        name = "other"
        version = "2.0"
    """,
    "other/2.0/lib/other.txt": "other's payload\n",
}
EVIL = b"#!/bin/sh\necho the attacker ran as $(id -un)\n"
EVIL_DEFINITION = b'name = "tools"\nversion = "1.0"\ndef commands():\n    env.PATH.prepend("/tmp/evil")\n'


# -- a store, a baked context, and editing it as an attacker would ------------


@dataclass
class Baked:
    rez: Rez
    workdir: Path
    store: Path
    outside: Path   # beside the store: nothing may read anything in it
    context: Path   # tools-1.0, baked by the real CLI
    cache: Path     # the cache bake used: it records main=store

    def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.rez.lazyfs(*args, timeout=timeout)

    def bake(self, context: Path, out: Path, cache: Path) -> subprocess.CompletedProcess:
        return ok(self.run("bake", context, "-o", out, "--mount", self.workdir / "mnt",
                           "--repo", f"{ALIAS}={self.store}", "--cache", cache))

    def forge(self, name: str, edit) -> Path:
        """A copy of the baked context whose section *edit* changed in place."""
        doc = json.loads(self.context.read_text())
        edit(doc[SECTION])
        forged = self.workdir / f"{name}.rxt"
        forged.write_text(json.dumps(doc))
        return forged

    def store_bytes(self, rel: str) -> bytes:
        return (self.store / rel).read_bytes()


@pytest.fixture
def baked(tmp_path) -> Baked:
    workdir = tmp_path / "work"
    workdir.mkdir()
    rez = Rez(workdir)
    store = tmp_path / "svr" / "packages"
    build_store(store, STORE)
    outside = tmp_path / "svr" / "outside"
    write_file(outside / "canary.txt", "outside the store\n")
    write_file(outside / "evil.sh", EVIL, 0o755)
    b = Baked(rez, workdir, store, outside, workdir / "baked.rxt", tmp_path / "bake-cache")
    b.bake(rez.resolve(["tools-1.0"], [store], workdir / "tools.rxt"), b.context, b.cache)
    return b


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    return result


def refused(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 1 with one `rez-lazyfs: error:` line naming *names*; returns it."""
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), describe(result)
    for name in names:
        assert name in lines[0], f"the error does not name {name!r}: {lines[0]}"
    return lines[0]


def warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("rez-lazyfs: warning: ")]


def named(warning: str, **paths: Path) -> str:
    """A warning line for the report, its paths by name."""
    text = warning[len("rez-lazyfs: warning: "):]
    for name, path in paths.items():
        text = text.replace(str(path), name)
    return text


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"`{' '.join(map(str, result.args))}` exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


def listing(section: dict, path: str) -> dict:
    return next(x for x in section["listings"] if x["repo"] == ALIAS and x["path"] == path)


def entries_of(record: dict) -> dict[bytes, Attr]:
    return decode_listing(base64.b64decode(record["entries"]))[0]


def set_entries(record: dict, entries: dict[bytes, Attr]) -> None:
    record["entries"] = b64(encode_listing(entries, 0.0))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def forged_attr(data: bytes, mode: int = stat.S_IFREG | 0o755, ino: int = 4242) -> Attr:
    now = time.time_ns()
    return Attr(mode, len(data), now, now, now, 1, 0, 0, ino=ino)


def embed_file(section: dict, path: str, data: bytes) -> None:
    """Embed *data* as the file *path*, consistently: its directory's listing
    (added if the section has none) names it with the identity it is given."""
    parent, _, name = path.rpartition("/")
    try:
        record = listing(section, parent)
    except StopIteration:
        record = {"repo": ALIAS, "path": parent, "entries": b64(encode_listing({}, 0.0))}
        section["listings"].append(record)
    attr = forged_attr(data)
    set_entries(record, {**entries_of(record), os.fsencode(name): attr})
    section["files"] = [f for f in section["files"] if f["path"] != path] + [
        {"repo": ALIAS, "path": path, "identity": list(attr.identity), "data": b64(data)}]


def add_listing(section: dict, path: str, entries: dict[bytes, Attr]) -> None:
    section["listings"].append({"repo": ALIAS, "path": path,
                                "entries": b64(encode_listing(entries, 0.0))})


def cache_snapshot(cache: Path) -> dict[str, tuple[int, int, int]]:
    """Every path in the cache directory with its size, mtime and mode."""
    if not cache.exists():
        return {}
    return {str(p.relative_to(cache)): (st.st_size, st.st_mtime_ns, st.st_mode)
            for p in sorted(cache.rglob("*")) for st in [p.lstat()]}


def assert_cache_unchanged(cache: Path, before: dict) -> None:
    after = cache_snapshot(cache)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"the cache {cache} changed: {changed[:10]}"


def status(baked: Baked, cache: Path) -> dict:
    return json.loads(ok(baked.run("status", "--json", "--cache", cache)).stdout)


def recorded_repos(cache: Path) -> list[RepoSpec]:
    opened = LocalCache(str(cache))
    try:
        return opened.recorded_repos()
    finally:
        opened.close()


def rows(data: dict) -> dict[str, dict]:
    return {f"{v['package']}-{v['version']}": v for v in data["variants"]}


# 3. what a baked context may put in the cache -------------------------------

# attack -> (edit of the section, what the refusal must name)
FORBIDDEN = {
    "bin/tool embedded as a file, with the attacker's script": (
        lambda s: embed_file(s, "tools/1.0/bin/tool", EVIL), "tools/1.0/bin/tool"),
    "a 'package.py' embedded in the variant's bin/": (
        lambda s: embed_file(s, "tools/1.0/bin/package.py", EVIL_DEFINITION),
        "tools/1.0/bin/package.py"),
    "the listing of a version the context does not use (tools/0.9/bin)": (
        lambda s: add_listing(s, "tools/0.9/bin", {b"tool": forged_attr(EVIL)}), "tools/0.9/bin"),
    "the listing of a family the context does not use (other)": (
        lambda s: add_listing(s, "other", {b"2.0": forged_attr(b"", stat.S_IFDIR | 0o755)}),
        "main/other"),
}


@pytest.mark.parametrize("command", ["seed", "populate"])
@pytest.mark.parametrize("attack", FORBIDDEN)
def test_embedded_data_off_the_variants_paths_is_refused(baked, command, attack, report):
    edit, names = FORBIDDEN[attack]
    forged = baked.forge("forbidden", edit)
    before = cache_snapshot(baked.cache)
    line = refused(baked.run(command, forged, "--cache", baked.cache), names, "refused")
    assert_cache_unchanged(baked.cache, before)
    report.row(f"`{command}` of a baked context whose section embeds {attack}",
               f"exit 1, cache unchanged: {line[len(ERROR_PREFIX):][:150]}")


def test_embedded_data_off_the_variants_paths_is_refused_with_the_store_away(baked, report):
    # The path rules do not depend on the store: with it gone, a forbidden
    # embed is refused just the same (and nothing is accepted "unchecked").
    forged = baked.forge("payload", FORBIDDEN["bin/tool embedded as a file, with the attacker's script"][0])
    baked.store.rename(baked.store.with_name("moved-away"))
    fresh = baked.workdir / "fresh-cache"
    line = refused(baked.run("seed", forged, "--cache", fresh), "tools/1.0/bin/tool")
    assert not fresh.exists(), "the refused seed created the cache"
    report.row("`seed` of a context embedding bin/tool (attacker's script), store unreachable, "
               "fresh cache", f"exit 1, no cache created: {line[len(ERROR_PREFIX):][:120]}")


def test_embedded_listing_and_definition_differing_from_the_store_lose_to_the_store(
        baked, lazyfs_mount, report):
    # On the variant's own paths, so allowed: bin/tool made a symlink to the
    # attacker's script outside the store, and an edited package.py.
    def edit(section):
        bin_dir = listing(section, "tools/1.0/bin")
        evil = os.fsencode(baked.outside / "evil.sh")
        link = Attr(stat.S_IFLNK | 0o777, len(evil), 1, 1, 1, 1, 0, 0, target=evil, ino=99)
        set_entries(bin_dir, {**entries_of(bin_dir), b"tool": link})
        embed_file(section, "tools/1.0/package.py", EVIL_DEFINITION)

    forged = baked.forge("differs", edit)
    cache = baked.workdir / "seeded-cache"
    result = ok(baked.run("seed", forged, "--cache", cache))
    said = warnings(result)
    assert len(said) == 1 and "differ from the store" in said[0] and "store holds" in said[0], \
        describe(result)

    m = lazyfs_mount({ALIAS: baked.store}, cache=cache, block_size=None)
    tool = m.path / ALIAS / "tools/1.0/bin/tool"
    definition = (m.path / ALIAS / "tools/1.0/package.py").read_bytes()
    assert not tool.is_symlink(), f"the mount serves the forged symlink -> {os.readlink(tool)}"
    assert tool.read_bytes() == baked.store_bytes("tools/1.0/bin/tool")
    assert definition == baked.store_bytes("tools/1.0/package.py")
    report.row("`seed` (store reachable) of a context whose bin/ listing makes bin/tool a symlink "
               "to the attacker's script and whose package.py is edited; then mounted",
               f"exit 0, '{named(said[0], STORE=baked.store)}'; the mount serves "
               f"bin/tool as a regular file with the store's {tool.stat().st_size} bytes and the "
               "store's package.py")


def test_embedded_definition_is_accepted_unchecked_only_when_the_store_does_not_answer(
        baked, lazyfs_mount, report):
    # The strongest forgery: the real file's identity (size, mtimes, inode:
    # all public), the attacker's bytes of the same length.
    real = baked.store / "tools/1.0/package.py"
    evil = EVIL_DEFINITION[:real.stat().st_size].ljust(real.stat().st_size, b"#")

    def same_identity(section):
        record = listing(section, "tools/1.0")
        entries = entries_of(record)
        set_entries(record, {**entries, b"package.py": Attr.from_stat(os.lstat(real))})
        section["files"] = [f for f in section["files"] if f["path"] != "tools/1.0/package.py"] + [
            {"repo": ALIAS, "path": "tools/1.0/package.py",
             "identity": list(Attr.from_stat(os.lstat(real)).identity), "data": b64(evil)}]

    forged = baked.forge("unchecked", same_identity)
    away = baked.store.with_name("moved-away")
    baked.store.rename(away)
    cache = baked.workdir / "offline-cache"
    result = ok(baked.run("seed", forged, "--cache", cache))
    said = warnings(result)
    assert len(said) == 1 and "unchecked" in said[0] and str(baked.store) in said[0], \
        describe(result)
    # The store comes back: what it holds wins over what the file brought,
    # whose blocks were kept apart (never taken for the store's bytes).
    away.rename(baked.store)
    m = lazyfs_mount({ALIAS: baked.store}, cache=cache, block_size=None)
    served = (m.path / ALIAS / "tools/1.0/package.py").read_bytes()
    report.row("`seed` of a context with an edited package.py while the store does not answer; "
               "then the store is back and the cache mounted",
               f"accepted (paths and types checked) and said so: "
               f"{said[0][len('rez-lazyfs: warning: '):][:140]}; once the store answers the "
               f"mount serves {'the store' if served == baked.store_bytes('tools/1.0/package.py') else 'THE FILE'}'s package.py")
    assert served == baked.store_bytes("tools/1.0/package.py")


def test_embedded_repos_never_repoint_the_cache(baked, lazyfs_mount, lazyfs_cli, tmp_path, report):
    # The attacker's own tree, and a section saying that is where "main" is.
    attacker = tmp_path / "attacker-tree"
    build_store(attacker, {"tools/1.0/package.py": EVIL_DEFINITION.decode(),
                           "tools/1.0/bin/tool": EVIL.decode()})
    forged = baked.forge("repointed", lambda s: s["repos"].update({ALIAS: str(attacker)}))
    ok(baked.run("populate", baked.context, "--cache", baked.cache))  # tool's blocks cached

    with INotify() as witness:
        witness.add_watch(attacker / "tools/1.0", flags.OPEN | flags.ACCESS)
        witness.add_watch(attacker / "tools/1.0/bin", flags.OPEN | flags.ACCESS)
        result = ok(baked.run("seed", forged, "--cache", baked.cache))
        assert witness.read(timeout=0) == [], "seeding read the attacker's tree"
    said = warnings(result)
    assert len(said) == 1 and str(attacker) in said[0] and str(baked.store) in said[0], \
        describe(result)
    assert recorded_repos(baked.cache) == [RepoSpec(ALIAS, str(baked.store))]

    fresh = tmp_path / "fresh-cache"
    ok(baked.run("seed", forged, "--cache", fresh))
    assert recorded_repos(fresh) == [], "seed recorded the section's repos"
    mp = tmp_path / "mnt-fresh"
    mp.mkdir()
    no_repos = lazyfs_cli.run("mount", mp, "--cache", fresh, "--offline")
    assert no_repos.returncode == 1 and not no_repos.mounted, no_repos.summary()
    assert "none recorded" in no_repos.one_line_error()

    # Offline, no --repo: the repositories come from what the cache recorded.
    m = lazyfs_mount({}, cache=baked.cache, offline=True, block_size=None)
    served = (m.path / ALIAS / "tools/1.0/bin/tool").read_bytes()
    assert served == baked.store_bytes("tools/1.0/bin/tool")
    report.row("`seed` of a context whose section says main is the attacker's tree, into a cache "
               "that records main=store, then an offline mount with no --repo",
               f"exit 0, '{named(said[0], ATTACKER=attacker, STORE=baked.store)}'; attacker's tree not "
               f"read; recorded repositories unchanged; the mount serves the store's bin/tool "
               f"({len(served)} bytes); a fresh cache records nothing and an offline mount of it "
               "is refused")


# 4. paths from a baked context ------------------------------------------------

ESCAPES = {
    "variant root '../outside'": lambda s: s["variants"][0].update(root="../outside"),
    "variant root 'tools/1.0/../../../outside'": lambda s: s["variants"][0].update(
        root="tools/1.0/../../../outside"),
    "absolute variant root": lambda s: s["variants"][0].update(root="/etc"),
    "a listing of '../outside'": lambda s: add_listing(
        s, "../outside", {b"canary.txt": forged_attr(b"outside the store\n")}),
    "a listing entry named '..' in bin/": lambda s: set_entries(
        listing(s, "tools/1.0/bin"), {**entries_of(listing(s, "tools/1.0/bin")),
                                      b"..": forged_attr(b"", stat.S_IFDIR | 0o755)}),
    "a file at '../outside/package.py'": lambda s: s["files"].append(
        {"repo": ALIAS, "path": "../outside/package.py", "identity": [1, 1, 1, 1], "data": b64(b"x")}),
}


@pytest.mark.parametrize("command", ["seed", "populate"])
@pytest.mark.parametrize("attack", ESCAPES)
def test_escaping_the_store_is_refused_and_nothing_outside_is_read(baked, command, attack, report):
    forged = baked.forge("escape", ESCAPES[attack])
    before = cache_snapshot(baked.cache)
    atime = (baked.outside / "canary.txt").stat().st_atime_ns
    with INotify() as witness:
        witness.add_watch(baked.outside, flags.OPEN | flags.ACCESS)
        result = baked.run(command, forged, "--cache", baked.cache)
        events = witness.read(timeout=0)
    line = refused(result)
    assert any(word in line for word in ("'..'", "absolute", "impossible name")), line
    assert events == [], f"{command} opened or read {len(events)} thing(s) outside the store"
    assert (baked.outside / "canary.txt").stat().st_atime_ns == atime
    assert_cache_unchanged(baked.cache, before)
    report.row(f"`{command}` of a baked context with {attack} (a canary beside the store, "
               "watched with inotify)",
               f"exit 1, no open or read outside the store, cache unchanged: "
               f"{line[len(ERROR_PREFIX):][:120]}")


# 7. a bake that embeds what not everyone may read -----------------------------

PRIVATE = {
    "a 0700 directory in the variant": ("tools/1.0/share/private/", 0o700),
    "a 0640 package.py": ("tools/1.0/package.py", 0o640),
}


@pytest.mark.parametrize("case", PRIVATE)
def test_private_store_data_makes_the_baked_context_private(baked, tmp_path, public_tmp,
                                                            throwaway_user, case, report):
    rel, mode = PRIVATE[case]
    private = baked.store / rel
    if rel.endswith("/"):
        write_file(private / "notes.txt", "names only the team may see\n")
    out_dir = public_tmp / "contexts"
    out_dir.mkdir(mode=0o755)
    context = baked.workdir / "tools.rxt"

    public = out_dir / "public.rxt"
    shown = baked.bake(context, public, tmp_path / "cache-public")
    assert not warnings(shown), describe(shown)
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert throwaway_user.run(["cat", public]).returncode == 0

    private.chmod(mode)
    secret = out_dir / "private.rxt"
    result = baked.bake(context, secret, tmp_path / "cache-private")
    said = warnings(result)
    assert len(said) == 1 and str(private).rstrip("/") in said[0] and "0600" in said[0], \
        describe(result)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    read = throwaway_user.run(["cat", secret])
    assert read.returncode != 0 and b"Permission denied" in read.stderr, read
    report.row(f"`bake` of a context whose store has {case}; another user reads the output",
               f"written 0600 with '{said[0][len('rez-lazyfs: warning: '):][:80]}...'; the other "
               f"user: {read.stderr.decode().strip()[:60]} (without it: 0644, readable)")


# 13. malformed sections ---------------------------------------------------------


def _set(path: tuple, value):
    def edit(section):
        target = section
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value(target[path[-1]]) if callable(value) else value
    return edit


# kind -> (edit, what the error names)
MALFORMED = {
    "an alias missing from repos": (_set(("listings", 0, "repo"), "elsewhere"), "'elsewhere'"),
    "garbage listing bytes": (_set(("listings", 0, "entries"), b64(deterministic_bytes(200, 7))),
                              "listings[0].entries"),
    "a listing that is not base64": (_set(("listings", 0, "entries"), "not base64!"),
                                     "not base64"),
    "mtime as a string": (_set(("files", 0, "identity", 1), str), "files[0].identity[1] is a string"),
    "a repository path as an integer": (_set(("repos", ALIAS), 42), "is an integer"),
    "a relative repository path": (_set(("repos", ALIAS), "svr/packages"), "absolute"),
    "a variant as a string": (_set(("variants", 0), "tools-1.0"), "variants[0] is a string"),
    "root as an integer": (_set(("variants", 0, "root"), 7), "variants[0].root is an integer"),
    "a root outside its NAME/VERSION": (_set(("variants", 0, "root"), "tools"), "variants[0].root"),
    "data shorter than its size": (_set(("files", 0, "data"), lambda d: b64(base64.b64decode(d)[:-1])),
                                   "bytes"),
    "an identity of three numbers": (_set(("files", 0, "identity"), lambda i: i[:3]), "3 numbers"),
    "a file its listing does not name so": (_set(("files", 0, "identity", 3), lambda n: n + 1),
                                            "files[0]"),
    "listings as an object": (_set(("listings",), {}), "listings is an object"),
    "null file data": (_set(("files", 0, "data"), None), "files[0].data is null"),
    "a root record that is a listing": (
        lambda s: s["roots"].update({ALIAS: listing(s, "tools/1.0")["entries"]}), "roots"),
    "no mountpoint": (lambda s: s.pop("mountpoint"), "'mountpoint'"),
    "a listing given twice": (lambda s: s["listings"].append(dict(s["listings"][0])), "second time"),
}


@pytest.mark.parametrize("command", ["seed", "populate"])
@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_section_is_one_line_and_writes_nothing(baked, command, kind, report):
    edit, names = MALFORMED[kind]
    forged = baked.forge("malformed", edit)
    before = cache_snapshot(baked.cache)
    line = refused(baked.run(command, forged, "--cache", baked.cache), "damaged", names)
    assert_cache_unchanged(baked.cache, before)
    report.row(f"`{command}` of a baked section with {kind}",
               f"exit 1, cache unchanged: {line[len(ERROR_PREFIX):][:130]}")


CHAIN_DEPTH = 1200


def test_deep_tree_of_1200_directories_bakes_seeds_and_populates(tmp_path, report):
    workdir = tmp_path / "work"
    workdir.mkdir()
    rez = Rez(workdir)
    store = tmp_path / "deep-store"
    build_store(store, {"tools/1.0/package.py": STORE["tools/1.0/package.py"]})
    bottom = store / "tools/1.0"
    for _ in range(CHAIN_DEPTH):  # not os.makedirs: it recurses once per level
        bottom = bottom / "d"
        bottom.mkdir()
    write_file(bottom / "leaf.txt", "at the bottom\n")
    try:
        b = Baked(rez, workdir, store, tmp_path, workdir / "deep.rxt", tmp_path / "cache")
        started = time.monotonic()
        b.bake(rez.resolve(["tools"], [store], workdir / "tools.rxt"), b.context, b.cache)
        baked_in = time.monotonic() - started
        listed = json.loads(b.context.read_text())[SECTION]["listings"]
        assert sum(x["path"].startswith("tools/1.0/d") for x in listed) == CHAIN_DEPTH

        started = time.monotonic()
        populated = ok(b.run("populate", b.context, "--cache", tmp_path / "other-cache"))
        populated_in = time.monotonic() - started
        assert "populated 2 file(s)" in populated.stdout, describe(populated)
        seeded = ok(b.run("seed", b.context, "--cache", tmp_path / "seeded-cache"))
        assert f"seeded {len(listed)} directory listing(s)" in seeded.stdout, describe(seeded)
    finally:
        # shutil.rmtree (and so pytest's clean-up) recurses once per level.
        subprocess.run(["rm", "-rf", str(store)], check=True, timeout=120)
    report.measure("bake of a 1,200-deep chain", f"{baked_in:.1f} s")
    report.measure("populate of a 1,200-deep chain (seed included)", f"{populated_in:.1f} s")
    report.row(f"`bake`, `populate` and `seed` of a variant holding a {CHAIN_DEPTH}-deep "
               "directory chain", f"all exit 0 (bake {baked_in:.1f} s, populate {populated_in:.1f} s), "
               f"{CHAIN_DEPTH} chain listings embedded, the leaf populated")


# 14. pins end with their context file ---------------------------------------------

BAKES = 40  # two cores: ~0.4 s of rez import each


def test_pins_of_deleted_or_replaced_contexts_are_released(baked, tmp_path, report):
    cache = tmp_path / "pins-cache"
    tools = baked.workdir / "tools.rxt"
    kept = baked.workdir / "kept.rxt"
    baked.bake(baked.rez.resolve(["other"], [baked.store], baked.workdir / "other.rxt"), kept, cache)
    outs = [baked.workdir / "many" / f"ctx-{i:03}.rxt" for i in range(BAKES)]
    outs[0].parent.mkdir()
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # two cores
        list(pool.map(lambda out: baked.bake(tools, out, cache), outs))
    bakes_took = time.monotonic() - started
    before = rows(status(baked, cache))
    assert before["tools-1.0"]["pinned"] and before["other-2.0"]["pinned"], before

    half = BAKES // 2
    for out in outs[:half]:
        out.unlink()
    first = status(baked, cache)
    assert first["released_pins"] == half, first
    for out in outs[half:-1]:
        out.unlink()
    replacement = outs[-1].with_suffix(".new")
    replacement.write_text(kept.read_text())  # another file now stands at that path
    replacement.replace(outs[-1])

    dry = ok(baked.run("clean", "--max-size", "0", "--dry-run", "--cache", cache))
    assert f"would release {half} pin(s)" in dry.stdout, describe(dry)
    started = time.monotonic()
    cleaned = ok(baked.run("clean", "--max-size", "0", "--cache", cache))
    clean_took = time.monotonic() - started
    assert f"released {half} pin(s)" in cleaned.stdout, describe(cleaned)
    after = rows(status(baked, cache))
    assert "tools-1.0" not in after, f"the released context's data was not evicted: {after}"
    assert after["other-2.0"]["pinned"] and after["other-2.0"]["bytes_cached"] > 0, after
    report.measure(f"{BAKES} bakes, two at a time", f"{bakes_took:.1f} s")
    report.row(f"{BAKES} bakes of one context to different outputs (a kept bake of another); "
               f"{half} deleted, then `status`; {half - 1} more deleted and one replaced by "
               "another file, then `clean --max-size 0`",
               f"status released {half} pins, clean {cleaned.stdout.splitlines()[0]!r} in "
               f"{clean_took:.1f} s; tools-1.0's data evicted, the kept context still pinned")


def test_pins_held_by_a_context_on_a_hung_filesystem_are_kept_within_a_bound(
        baked, fault_store, tmp_path, report):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(baked.context, home / "ctx.rxt")
    fs = fault_store(home)
    cache = tmp_path / "hung-cache"
    ok(baked.run("seed", fs.path / "ctx.rxt", "--cache", cache))

    fs.freeze()  # the home directory's filesystem stops answering
    try:
        started = time.monotonic()
        result = baked.run("clean", "--max-size", "0", "--cache", cache, timeout=HOLDER_TIMEOUT + 55)
        took = time.monotonic() - started
    finally:
        fs.thaw()
    ok(result)
    said = [line for line in warnings(result) if "did not answer" in line]
    assert len(said) == 1 and f"within {HOLDER_TIMEOUT:g}s" in said[0], describe(result)
    assert took < HOLDER_TIMEOUT + 15, f"clean took {took:.1f} s with a hung context file"
    assert "evicted 0 file(s)" in result.stdout, describe(result)
    after = status(baked, cache)  # the filesystem answers again: the same file, still pinned
    assert after["released_pins"] == 0 and after["size_bytes"] > 0, after
    assert all(v["pinned"] for v in after["variants"]), after
    report.measure("clean with a context file on a SIGSTOPped FUSE filesystem", f"{took:.1f} s")
    report.row("`clean --max-size 0` while the one pinned context's file is on a filesystem "
               "that stopped answering (FUSE daemon SIGSTOPped)",
               f"returned in {took:.1f} s (bound {HOLDER_TIMEOUT:g} s + 15): "
               f"'{said[0][len('rez-lazyfs: warning: '):]}'; the pin kept")
