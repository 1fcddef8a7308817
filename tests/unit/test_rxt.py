"""mount.rxt against contexts written and sourced by the real rez.

The mount is simulated by a copy of the store at <tmp>/mnt/<alias>; the store
is deleted before the rebased context is sourced, so anything still reading
the store fails.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.rezrepo import DIRECTORY, Rez, Symlink, build_store, hashed_variant_dir
from mount import rxt
from mount.errors import UserError

# One package per shape that matters to {root}: no variants, plain variants
# (root = <version>/<requires...>), hashed variants reached via a shortlink
# (root = <version>/_v/a), and a requires chain.
PACKAGES = {
    "base/1.0/package.py": """
        name = "base"
        version = "1.0"
    """,
    "python/2.7/package.py": """
        name = "python"
        version = "2.7"
        requires = ["base"]
    """,
    "python/3.11/package.py": """
        name = "python"
        version = "3.11"
        requires = ["base"]
    """,
    "lib/2.1/package.py": """
        name = "lib"
        version = "2.1"
        variants = [["python-2"], ["python-3"]]
        def commands():
            env.PYTHONPATH.prepend("{root}/python")
    """,
    "plugin/1.0/package.py": """
        name = "plugin"
        version = "1.0"
        hashed_variants = True
        variants = [["python-3"]]
        def commands():
            env.PATH.append("{root}/bin")
    """,
    "tool/1.0.0/package.py": """
        name = "tool"
        version = "1.0.0"
        requires = ["lib", "python-3"]
        def commands():
            env.PATH.prepend("{root}/bin")
            env.PYTHONPATH.prepend("{root}/python")
    """,
    "tool/1.0.0/bin/toolcmd": """
        #!/bin/sh
        echo "tool ran from $0"
    """,
    # what rez-build installs for the variants: one payload directory each,
    # and for the hashed variant a shortlink _v/a to its hash directory
    "lib/2.1/python-2/python/": DIRECTORY,
    "lib/2.1/python-3/python/": DIRECTORY,
    f"plugin/1.0/{hashed_variant_dir(['python-3'])}/bin/": DIRECTORY,
    "plugin/1.0/_v/a": Symlink(f"../{hashed_variant_dir(['python-3'])}"),
}


@dataclass
class Baked:
    rez: Rez
    store: Path
    mount: Path
    original: Path  # as rez wrote it, pointing at the (now deleted) store
    baked: Path
    unmapped: list[str]

    @property
    def alias_root(self) -> str:
        return os.path.realpath(self.mount / "main")


@pytest.fixture(scope="module")
def rez(tmp_path_factory) -> Rez:
    return Rez(tmp_path_factory.mktemp("rez"))


@pytest.fixture(scope="module")
def baked(rez, tmp_path_factory) -> Baked:
    tmp = tmp_path_factory.mktemp("baked")
    store = tmp / "svr" / "packages"
    build_store(store, PACKAGES)
    original = rez.resolve(["tool", "plugin"], [store], tmp / "original.rxt")

    mount = tmp / "mnt"
    shutil.copytree(store, mount / "main", symlinks=True)
    shutil.rmtree(store)

    rebased, unmapped = rxt.rebase_context(rxt.load_context(str(original)), {"main": str(store)}, str(mount))
    out = tmp / "baked.rxt"
    rxt.write_context(rebased, str(out))
    return Baked(rez, store, mount, original, out, unmapped)


# -- rebasing real contexts --

def test_original_context_cannot_be_sourced_once_the_store_is_gone(baked):
    # The control for the tests below: rez re-reads package.py from the
    # handle's location, so an unrebased context breaks without the store.
    result = baked.rez.source(baked.original, ["true"])
    assert result.returncode != 0
    assert "Missing package definition file" in result.stderr


def test_baked_context_sources_every_root_from_the_mount(baked):
    environ = baked.rez.source_environ(baked.baked)
    root = baked.alias_root
    assert baked.unmapped == []
    assert environ["REZ_BASE_ROOT"] == f"{root}/base/1.0"
    assert environ["REZ_PYTHON_ROOT"] == f"{root}/python/3.11"
    assert environ["REZ_LIB_ROOT"] == f"{root}/lib/2.1/python-3"
    assert environ["REZ_PLUGIN_ROOT"] == f"{root}/plugin/1.0/_v/a"
    assert environ["REZ_TOOL_ROOT"] == f"{root}/tool/1.0.0"
    assert environ["PATH"].split(os.pathsep)[0] == f"{root}/tool/1.0.0/bin"
    assert f"{root}/plugin/1.0/_v/a/bin" in environ["PATH"].split(os.pathsep)
    assert environ["PYTHONPATH"].split(os.pathsep) == [f"{root}/tool/1.0.0/python", f"{root}/lib/2.1/python-3/python"]
    assert environ["REZ_USED_PACKAGES_PATH"] == root
    assert not [k for k, v in environ.items() if str(baked.store) in v]


def test_baked_context_runs_tools_from_the_mount(baked):
    result = baked.rez.source(baked.baked, ["toolcmd"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tool ran from {baked.alias_root}/tool/1.0.0/bin/toolcmd"


def test_rebase_turns_off_rez_package_caching_and_keeps_the_input(baked):
    doc = rxt.load_context(str(baked.original))
    pristine = copy.deepcopy(doc)
    rebased, _ = rxt.rebase_context(doc, {"main": str(baked.store)}, str(baked.mount))
    assert doc == pristine
    assert doc["package_caching"] is True
    assert rebased["package_caching"] is False
    assert {h["variables"]["location"] for h in rebased["resolved_packages"]} == {baked.alias_root}
    assert rxt.load_context(str(baked.baked)) == rebased


def test_context_variants_give_the_roots_rez_binds(baked, monkeypatch):
    # the same minimal config the rez subprocesses read
    monkeypatch.setenv("REZ_CONFIG_FILE", str(baked.rez.config))
    monkeypatch.setenv("REZ_DISABLE_HOME_CONFIG", "1")
    variants = rxt.context_variants(rxt.load_context(str(baked.baked)))
    environ = baked.rez.source_environ(baked.baked)

    assert {v.name: v.root for v in variants} == {
        v.name: environ[f"REZ_{v.name.upper()}_ROOT"] for v in variants}
    by_name = {v.name: v for v in variants}
    assert sorted(v.qualified_name for v in variants) == ["base-1.0", "lib-2.1", "plugin-1.0", "python-3.11", "tool-1.0.0"]
    assert (by_name["lib"].index, by_name["lib"].subpath) == (1, "python-3")
    assert (by_name["plugin"].index, by_name["plugin"].subpath) == (0, "_v/a")
    assert (by_name["tool"].index, by_name["tool"].subpath) == (None, None)
    assert {v.location for v in variants} == {baked.alias_root}


def test_context_variants_fail_clearly_when_definitions_are_unreadable(baked):
    with pytest.raises(UserError, match=r"cannot read the package definition of base-1.0 from .*/svr/packages"):
        rxt.context_variants(rxt.load_context(str(baked.original)))


def test_store_and_mountpoint_given_through_symlinks_and_trailing_slashes(rez, tmp_path):
    # rez records the store's realpath and rejects a handle location that is
    # not canonical ("location mismatch"), whatever spelling the config uses.
    filer = tmp_path / "filer" / "packages"
    build_store(filer, PACKAGES)
    (tmp_path / "svr").mkdir()
    (tmp_path / "svr" / "packages").symlink_to(filer)
    original = rez.resolve(["tool"], [tmp_path / "svr" / "packages"], tmp_path / "original.rxt")

    (tmp_path / "real-mnt").mkdir()
    shutil.copytree(filer, tmp_path / "real-mnt" / "main", symlinks=True)
    (tmp_path / "mnt").symlink_to(tmp_path / "real-mnt")
    shutil.rmtree(filer)

    rebased, unmapped = rxt.rebase_context(
        rxt.load_context(str(original)), {"main": f"{tmp_path}/svr/packages/"}, f"{tmp_path}/mnt/")
    rxt.write_context(rebased, str(tmp_path / "baked.rxt"))
    environ = rez.source_environ(tmp_path / "baked.rxt")

    assert unmapped == []
    assert environ["REZ_TOOL_ROOT"] == os.path.realpath(tmp_path / "real-mnt" / "main" / "tool" / "1.0.0")


def test_variants_from_unmirrored_repositories_are_listed_and_left_alone(rez, tmp_path):
    main, other = tmp_path / "svr" / "packages", tmp_path / "home" / "dev-packages"
    build_store(main, PACKAGES)
    build_store(other, {"extra/1.0/package.py": """
        name = "extra"
        version = "1.0"
    """})
    doc = rxt.load_context(str(rez.resolve(["tool", "extra"], [main, other], tmp_path / "ctx.rxt")))

    rebased, unmapped = rxt.rebase_context(doc, {"main": str(main)}, str(tmp_path / "mnt"))

    assert unmapped == ["extra-1.0"]
    locations = {h["variables"]["name"]: h["variables"]["location"] for h in rebased["resolved_packages"]}
    assert locations.pop("extra") == str(other)
    assert set(locations.values()) == {str(tmp_path / "mnt" / "main")}
    assert rebased["package_paths"] == [str(tmp_path / "mnt" / "main"), str(other)]


def test_repositories_below_a_store_path_keep_their_place_in_the_mount(baked):
    doc = rxt.load_context(str(baked.original))
    rebased, unmapped = rxt.rebase_context(doc, {"svr": str(baked.store.parent)}, str(baked.mount))
    assert unmapped == []
    assert rebased["package_paths"] == [os.path.realpath(baked.mount / "svr" / "packages")]


def test_typed_package_paths_are_rebased_only_for_the_filesystem_type(baked):
    doc = rxt.load_context(str(baked.original))
    doc["package_paths"] = [f"filesystem@{baked.store}", f"memory@{baked.store}"]
    rebased, _ = rxt.rebase_context(doc, {"main": str(baked.store)}, str(baked.mount))
    assert rebased["package_paths"] == [f"filesystem@{baked.alias_root}", f"memory@{baked.store}"]


# -- bad input --

def assert_one_line_user_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def real_context_text(baked) -> str:
    return baked.original.read_text()


def test_missing_context_file(tmp_path):
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "nope.rxt"))
    assert_one_line_user_error(excinfo, "not found", "nope.rxt")


def test_empty_context_file(tmp_path):
    (tmp_path / "empty.rxt").write_text("\n")
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "empty.rxt"))
    assert_one_line_user_error(excinfo, "is empty")


@pytest.mark.parametrize("content", [
    '{"serialize_version": "4.9",, "resolved_packages": []}',
    "serialize_version: '4.9'\nresolved_packages: []\n",
    "\x00\x01 binary junk }",
])
def test_malformed_json(tmp_path, content):
    (tmp_path / "bad.rxt").write_text(content)
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "bad.rxt"))
    assert_one_line_user_error(excinfo, "is not JSON", "bad.rxt")


def test_non_utf8_file(tmp_path):
    (tmp_path / "bad.rxt").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "bad.rxt"))
    assert_one_line_user_error(excinfo, "is not a rez context")


def test_every_truncation_of_a_real_context_is_reported_as_such(baked, tmp_path):
    text = real_context_text(baked)
    cut = tmp_path / "cut.rxt"
    misreported = {}
    for length in range(1, len(text)):
        cut.write_text(text[:length])
        with pytest.raises(UserError) as excinfo:
            rxt.load_context(str(cut))
        if "cut.rxt is truncated" not in str(excinfo.value):
            misreported[length] = str(excinfo.value)
    assert misreported == {}
    assert_one_line_user_error(excinfo, "is truncated")


@pytest.mark.parametrize("content, fragment", [
    ({"name": "tool", "version": "1.0.0"}, "it has no"),
    ([1, 2, 3], "holds a JSON list"),
    ("just a string", "holds a JSON str"),
])
def test_json_that_is_not_a_context(tmp_path, content, fragment):
    (tmp_path / "package.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "package.json"))
    assert_one_line_user_error(excinfo, "is not a rez context", fragment)


@pytest.mark.parametrize("field, value, fragment", [
    ("resolved_packages", ["tool-1.0.0"], "resolved_packages[0] is not a variant handle"),
    ("resolved_packages", [{"key": "filesystem.variant", "variables": {"name": "tool"}}],
     "resolved_packages[0] is not a variant handle"),
    ("resolved_packages", {}, "resolved_packages is not a list"),
    ("package_paths", "/svr/packages", "package_paths is not a list of paths"),
])
def test_context_with_a_malformed_field(baked, tmp_path, field, value, fragment):
    doc = json.loads(real_context_text(baked))
    doc[field] = value
    (tmp_path / "bad.rxt").write_text(json.dumps(doc))
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "bad.rxt"))
    assert_one_line_user_error(excinfo, "is not a rez context", fragment)


@pytest.mark.parametrize("version", ["5.0", "3.0", "four"])
def test_unsupported_serialize_version(baked, tmp_path, version):
    doc = json.loads(real_context_text(baked))
    doc["serialize_version"] = version
    (tmp_path / "old.rxt").write_text(json.dumps(doc))
    with pytest.raises(UserError) as excinfo:
        rxt.load_context(str(tmp_path / "old.rxt"))
    assert_one_line_user_error(excinfo, "serialize_version", version)


def test_newer_minor_serialize_version_loads(baked, tmp_path):
    doc = json.loads(real_context_text(baked))
    doc["serialize_version"] = "4.12"
    (tmp_path / "newer.rxt").write_text(json.dumps(doc))
    assert rxt.load_context(str(tmp_path / "newer.rxt"))["serialize_version"] == "4.12"


# -- writing --

def test_write_replaces_an_existing_context_and_leaves_no_temporary_file(baked, tmp_path):
    out = tmp_path / "ctx.rxt"
    out.write_text("old")
    doc = rxt.load_context(str(baked.baked))
    rxt.write_context(doc, str(out))
    assert rxt.load_context(str(out)) == doc
    assert out.read_text() == baked.baked.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["ctx.rxt"]


@pytest.mark.parametrize("where", ["missing-dir/ctx.rxt", "a-file/ctx.rxt", "a-dir"])
def test_write_to_an_impossible_place(baked, tmp_path, where):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-dir").mkdir()
    out = tmp_path / where
    with pytest.raises(UserError) as excinfo:
        rxt.write_context(rxt.load_context(str(baked.baked)), str(out))
    assert_one_line_user_error(excinfo, "cannot write context to", str(out))
    assert not out.is_file()
    assert sorted(os.listdir(tmp_path)) == ["a-dir", "a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_write_into_a_read_only_directory(baked, tmp_path):
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    try:
        with pytest.raises(UserError) as excinfo:
            rxt.write_context(rxt.load_context(str(baked.baked)), str(out_dir / "ctx.rxt"))
        assert_one_line_user_error(excinfo, "Permission denied")
        assert os.listdir(out_dir) == []
    finally:
        out_dir.chmod(0o755)


def test_a_failed_write_keeps_the_old_context_whole(baked, tmp_path, monkeypatch):
    out = tmp_path / "ctx.rxt"
    out.write_text("old context")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError) as excinfo:
        rxt.write_context(rxt.load_context(str(baked.baked)), str(out))
    assert_one_line_user_error(excinfo, "No space left on device")
    assert out.read_text() == "old context"
    assert os.listdir(tmp_path) == ["ctx.rxt"]
