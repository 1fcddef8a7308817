"""Pins that a studio's toolset management drives (issue 14, item 3), end to
end: `rez-lazyfs pin` / `unpin` of package versions, baked contexts and list
files, run with the real CLI against caches that real mounts fill, cleaned
with the real `clean`, and read back through a remount with the stores
renamed away (so what is served can only come from the cache).

REP-003's studios: "provide a set of keep-alive packages ... coming from
external sources to help the cleaning mechanism out".
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.mounts import LazyMount
from helpers.rezrepo import Rez, build_store
from helpers.trees import KiB, deterministic_bytes
from helpers.workload import LazyfsCommands, read_whole, row_of

ERROR_PREFIX = "rez-lazyfs: error: "

# Two repositories. maya-2024.2 is in both, with two variants; the rest is
# what clean may evict (another maya, nuke, the pyver packages).
MAIN = {
    "pyver/1.0/package.py": 'name = "pyver"\nversion = "1.0"\n',
    "pyver/2.0/package.py": 'name = "pyver"\nversion = "2.0"\n',
    "maya/2024.2/package.py": """
        name = "maya"
        version = "2024.2"
        variants = [["pyver-1"], ["pyver-2"]]
    """,
    "maya/2024.2/pyver-1/bin/maya": deterministic_bytes(3 * 64 * KiB + 10, seed=1),
    "maya/2024.2/pyver-2/bin/maya": deterministic_bytes(2 * 64 * KiB + 20, seed=2),
    "maya/2024.2/pyver-2/lib/libmaya.so": deterministic_bytes(5000, seed=3),
    "maya/2024.1/package.py": 'name = "maya"\nversion = "2024.1"\n',
    "maya/2024.1/bin/maya": deterministic_bytes(64 * KiB, seed=4),
    "nuke/15.0/package.py": 'name = "nuke"\nversion = "15.0"\n',
    "nuke/15.0/bin/nuke": deterministic_bytes(64 * KiB + 5, seed=5),
}
DEV = {
    "maya/2024.2/package.py": 'name = "maya"\nversion = "2024.2"\n',
    "maya/2024.2/bin/maya": deterministic_bytes(64 * KiB + 30, seed=6),
}
MAYA = sorted(p for p in MAIN if p.startswith("maya/2024.2/"))
MAYA_DEV = sorted(DEV)
OTHERS = sorted(p for p in MAIN if p not in MAYA)


class Studio:
    """The two stores, a mount of them, and the CLI on the mount's cache."""

    def __init__(self, tmp_path: Path, lazyfs_mount):
        self.tmp_path = tmp_path
        self.stores = {"main": tmp_path / "svr" / "main", "dev": tmp_path / "svr" / "dev"}
        build_store(self.stores["main"], MAIN)
        build_store(self.stores["dev"], DEV)
        self.rez = Rez(tmp_path)
        self.mount: LazyMount = lazyfs_mount(self.stores)
        self.cli = LazyfsCommands(tmp_path / "commands", self.mount.cache,
                                  self.rez.environ([tmp_path / "no-packages-here"]))

    def read(self, alias: str, relpaths) -> None:
        for rel in relpaths:
            read_whole(self.mount.repo_path(alias) / rel)

    def cached(self) -> dict[tuple[str, str], int]:
        """(store path of the version, version) -> bytes cached, per status row."""
        return {(v["store_path"], v["version"]): v["bytes_cached"]
                for v in self.cli.status_when_flushed()["variants"] if v["bytes_cached"]}

    def pins(self) -> list[dict]:
        """The pins `pin` made, as status --json lists them."""
        return [p for p in self.cli.status()["pins"] if p["kind"] != "definitions"]

    def fails(self, command: str, *args) -> str:
        """The one error line of a command that must fail the documented way."""
        result = subprocess.run(self.cli.argv(command, *args), env=self.cli.environ(),
                                cwd=self.tmp_path, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
        shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, shown
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), shown
        return lines[0][len(ERROR_PREFIX):]

    def stores_away_and_remount(self) -> None:
        """Rename the stores away and remount: what is read now is cached or fails."""
        for store in self.stores.values():
            store.rename(store.with_name(store.name + "-moved-away"))
            self.mount.expect_log(str(store))
        self.mount.remount(store_timeout=2)

    def content(self, alias: str, rel: str) -> bytes:
        store = self.stores[alias]
        moved = store.with_name(store.name + "-moved-away")
        return ((moved if moved.exists() else store) / rel).read_bytes()

    def bytes_of(self, alias: str, relpaths) -> int:
        return sum(len(self.content(alias, rel)) for rel in relpaths)


@pytest.fixture
def studio(tmp_path, lazyfs_mount) -> Studio:
    return Studio(tmp_path, lazyfs_mount)


def test_a_pinned_package_version_keeps_every_variant_in_every_repository(studio):
    out = studio.cli.run("pin", "maya-2024.2")
    assert out.splitlines() == ["pinned maya-2024.2 (from command line)",
                                "1 pinned, 0 updated, 0 unchanged, 0 unpinned"], out
    # Read after pinning: a pin is a rule clean evaluates, not the keys cached then.
    studio.read("main", MAIN)
    studio.read("dev", DEV)

    report = studio.cli.clean("--max-size", 0)

    assert report["evicted_files"] == len(OTHERS) and report["pins"] == 1, report
    main, dev = (str(s) for s in studio.stores.values())
    assert studio.cached() == {(f"{main}/maya/2024.2", "2024.2"): studio.bytes_of("main", MAYA),
                               (f"{dev}/maya/2024.2", "2024.2"): studio.bytes_of("dev", MAYA_DEV)}
    [pin] = studio.pins()
    assert pin == {"pin": "maya-2024.2", "kind": "package", "from": ["command line"],
                   "paths": [f"{dev}/maya/2024.2", f"{main}/maya/2024.2"],  # by alias
                   "files_cached": len(MAYA) + len(MAYA_DEV),
                   "bytes_cached": studio.bytes_of("main", MAYA) + studio.bytes_of("dev", MAYA_DEV)}
    status = studio.cli.run("status")
    assert "PINNED" in status and "maya-2024.2  package" in status, status

    studio.stores_away_and_remount()
    for alias, files in (("main", MAYA), ("dev", MAYA_DEV)):
        for rel in files:
            assert read_whole(studio.mount.repo_path(alias) / rel) == studio.content(alias, rel)
    with pytest.raises(OSError):
        read_whole(studio.mount.repo_path("main") / "nuke/15.0/bin/nuke")


def test_an_alias_pins_one_repository_and_status_shows_it_before_anything_is_cached(studio):
    studio.cli.run("pin", "dev:maya-2024.2")
    status = studio.cli.status()
    # Pinned, nothing cached yet: the row is there, pinned, with the version's size.
    row = row_of(status, "maya", "2024.2")
    assert (row["pinned"], row["bytes_cached"], row["store_path"]) == (
        True, 0, f"{studio.stores['dev']}/maya/2024.2"), row
    studio.read("main", MAYA)
    studio.read("dev", DEV)

    studio.cli.clean("--max-size", 0)

    assert studio.cached() == {(f"{studio.stores['dev']}/maya/2024.2", "2024.2"):
                               studio.bytes_of("dev", MAYA_DEV)}


def test_pin_populate_fetches_every_file_of_what_is_pinned(studio):
    out = studio.cli.run("pin", "maya-2024.2", "--populate")
    assert f"populated {len(MAYA) + len(MAYA_DEV)} file(s)" in out, out

    studio.stores_away_and_remount()
    for alias, files in (("main", MAYA), ("dev", MAYA_DEV)):
        for rel in files:
            assert read_whole(studio.mount.repo_path(alias) / rel) == studio.content(alias, rel)


def bake(studio: Studio, request: list[str], out: Path) -> Path:
    context = studio.rez.resolve(request, [studio.stores["main"]], studio.tmp_path / "shot.rxt")
    out.parent.mkdir(parents=True, exist_ok=True)
    studio.cli.run("bake", context, "-o", out, "--mount", studio.mount.path,
                   "--repo", f"main={studio.stores['main']}")
    return out


def test_a_pinned_context_keeps_its_variants_until_its_file_goes(studio):
    baked = bake(studio, ["maya-2024.2", "pyver-2"], studio.tmp_path / "shot.lazy.rxt")
    studio.cli.run("pin", baked)
    studio.read("main", MAIN)

    studio.cli.clean("--max-size", 0)

    main = studio.stores["main"]
    variant = [p for p in MAYA if p.startswith("maya/2024.2/pyver-2/")] + ["maya/2024.2/package.py"]
    pyver = "pyver/2.0/package.py"
    assert studio.cached() == {(f"{main}/maya/2024.2", "2024.2"): studio.bytes_of("main", variant),
                               (f"{main}/pyver/2.0", "2.0"): studio.bytes_of("main", [pyver])}
    [pin] = studio.pins()
    assert (pin["pin"], pin["kind"], pin["files_cached"]) == (str(baked), "context",
                                                             len(variant) + 1), pin

    baked.unlink()  # SECURITY.md rule 16: pins end with their context
    report = studio.cli.clean("--max-size", 0)
    assert report["released_pins"] == 2 and report["size_after"] == 0, report  # bake's and pin's
    assert studio.pins() == []


def test_a_list_applied_twice_changes_nothing_and_sync_drops_only_its_own_pins(studio):
    baked = bake(studio, ["maya-2024.2", "pyver-2"], studio.tmp_path / "shots" / "a.lazy.rxt")
    toolset = studio.tmp_path / "toolset.txt"
    toolset.write_text("# production, from the toolset manager\n"
                       "maya-2024.2\n"
                       "\n"
                       "main:nuke-15.0   # compositing\n"
                       "shots/a.lazy.rxt\n")

    first = studio.cli.run("pin", "--sync", toolset)
    assert first.splitlines()[-1] == "3 pinned, 0 updated, 0 unchanged, 0 unpinned", first
    pins = studio.pins()
    assert sorted((p["pin"], p["from"]) for p in pins) == sorted(
        (name, [str(toolset)]) for name in ("maya-2024.2", "main:nuke-15.0", str(baked)))
    again = studio.cli.run("pin", "--sync", toolset)
    assert again.splitlines() == ["0 pinned, 0 updated, 3 unchanged, 0 unpinned"], again
    assert studio.pins() == pins

    # maya is pinned by hand too; the list drops maya and nuke.
    studio.cli.run("pin", "maya-2024.2")
    toolset.write_text("shots/a.lazy.rxt\n")
    synced = studio.cli.run("pin", "--sync", toolset)
    assert sorted(synced.splitlines()) == sorted([
        "unpinned main:nuke-15.0",
        "updated maya-2024.2 (from command line)",
        "0 pinned, 1 updated, 1 unchanged, 1 unpinned"]), synced
    assert sorted((p["pin"], p["from"]) for p in studio.pins()) == [
        (str(baked), [str(toolset)]), ("maya-2024.2", ["command line"])]

    # Unpinning the list drops what only it pinned; the name goes by name.
    studio.cli.run("unpin", toolset)
    assert [(p["pin"], p["from"]) for p in studio.pins()] == [("maya-2024.2", ["command line"])]
    out = studio.cli.run("unpin", "maya-2024.2", "nuke-15.0")
    assert "unpinned maya-2024.2" in out and "not pinned: nuke-15.0" in out, out
    assert studio.pins() == []


def write(path: Path, data: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


# what is wrong -> (the arguments of pin, given the studio; what the error names)
BAD = {
    "no version": (lambda s: ["maya"], "'maya' is not FAMILY-VERSION"),
    "an empty version": (lambda s: ["maya-"], "no version"),
    "a colon in the alias": (lambda s: ["a:b:maya-2024.2"], "an alias is a plain name"),
    "not a rez name": (lambda s: ["Maya Tool-1"], "not a rez package name"),
    "a version nobody holds": (lambda s: ["maya-2099.1"], "no repository holds maya-2099.1"),
    "an unknown alias": (lambda s: ["farm:maya-2024.2"], "no repository 'farm'"),
    "a missing file": (lambda s: ["./missing.txt"], "no such file: ./missing.txt"),
    "a bad line": (lambda s: [write(s.tmp_path / "l.txt", "nuke-15.0\n# fine\nbad-\n")],
                   "l.txt, line 3: 'bad-' is not FAMILY-VERSION"),
    "one line of many nobody holds": (
        lambda s: [write(s.tmp_path / "l.txt", "nuke-15.0\nmaya-2099.1\n")],
        "no repository holds maya-2099.1"),
    "a list naming a list": (
        lambda s: [write(s.tmp_path / "l.txt", "./other.txt\n"),
                   write(s.tmp_path / "other.txt", "nuke-15.0\n")][:1],
        "lists do not name lists"),
    "a list that is not text": (lambda s: [write(s.tmp_path / "l.txt", b"\xff\xfe\x00maya")],
                                "not UTF-8 text"),
    "a context never baked": (
        lambda s: [str(s.rez.resolve(["nuke"], [s.stores["main"]], s.tmp_path / "raw.rxt"))],
        "was not baked by rez-lazyfs"),
    "a truncated context": (lambda s: [write(s.tmp_path / "cut.rxt", '{"serialize_version": "4.9"')],
                            "cut.rxt is truncated"),
    "--sync of a name": (lambda s: ["--sync", "nuke-15.0"], "--sync takes list files"),
}


@pytest.mark.parametrize("problem", BAD)
def test_bad_names_and_files_are_clean_errors_and_pin_nothing(studio, problem):
    studio.cli.run("pin", "maya-2024.1")
    before = studio.pins()
    args, named = BAD[problem]
    error = studio.fails("pin", *args(studio))
    assert named in error, error
    assert studio.pins() == before


def test_unpin_of_a_bad_name_is_a_clean_error(studio):
    assert "not FAMILY-VERSION" in studio.fails("unpin", "maya")


def test_pin_json_says_what_changed(studio):
    report = json.loads(studio.cli.run("pin", "nuke-15.0", "--json"))
    assert report == {"changes": [{"pin": "nuke-15.0", "kind": "package", "change": "pinned",
                                   "from": ["command line"]}]}
