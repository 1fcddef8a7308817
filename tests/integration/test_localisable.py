"""REP-003's non-localisable packages (issue 14, item 4), end to end: real
rez packages that say `cachable = False` or `relocatable = False`, rez
configurations with the default_cachable* settings, contexts resolved by the
real rez, baked with the real CLI, mounted for real and sourced with stock
`rez-env --input`.

bake asks rez itself (Package.is_cachable) which variants may move from the
store onto the mount, and leaves the others at their store path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.rezrepo import Rez, build_store

ALIAS = "main"
WARNING = "rez-lazyfs: warning: rez would not cache "


def package(name: str, attributes: str = "") -> dict:
    """A package whose commands put {root}/bin on PATH, with a tool there
    that says where it ran from."""
    return {
        f"{name}/1.0/package.py": f'name = "{name}"\nversion = "1.0"\n{attributes}'
                                  'def commands():\n    env.PATH.prepend("{root}/bin")\n',
        f"{name}/1.0/bin/{name}-tool": f'#!/bin/sh\necho "{name} ran from $0"\n',
    }


STORE = {
    **package("tools"),
    **package("nocache", "cachable = False\n"),
    **package("norel", "relocatable = False\n"),
    **package("plain"),
    **package("yescache", "cachable = True\n"),
}
PACKAGES = ["tools", "nocache", "norel", "plain", "yescache"]
NOT_CACHABLE = {"nocache", "norel"}  # with rez's configuration left as shipped


class Shop:
    """A store of those packages, and rez with a configuration of the test's."""

    def __init__(self, tmp_path, config: str = ""):
        self.tmp_path = tmp_path
        self.store = tmp_path / "svr" / "packages"
        build_store(self.store, STORE)
        self.rez = Rez(tmp_path)
        with open(self.rez.config, "a") as f:
            f.write(config.replace("STORE", os.path.realpath(self.store)))

    def bake(self, context, mountpoint, *options, cache=None, env: dict | None = None):
        """The baked context, and the packages the warnings say were left in the store.
        `cache`: the running mount's, when one runs at `mountpoint` (bake --mount
        refuses another)."""
        out = self.tmp_path / "baked.rxt"
        result = self.rez.lazyfs("bake", context, "-o", out, "--mount", mountpoint,
                                 "--repo", f"{ALIAS}={self.store}", "--cache",
                                 cache or self.tmp_path / "cache", *options, env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        left = {line[len(WARNING):].split("-1.0 ")[0] for line in result.stderr.splitlines()
                if line.startswith(WARNING)}
        return out, left


def locations(baked) -> dict[str, str]:
    doc = json.loads(baked.read_text())
    return {h["variables"]["name"]: h["variables"]["location"] for h in doc["resolved_packages"]}


def where_each_tool_ran(shop: Shop, baked) -> dict[str, str]:
    """name -> the path each package's tool ran from, in the sourced context."""
    script = ";".join(f"{name}-tool" for name in PACKAGES)
    result = shop.rez.source(baked, ["sh", "-c", script])
    assert result.returncode == 0, result.stderr
    return {line.split(" ran from ")[0]: line.split(" ran from ")[1]
            for line in result.stdout.splitlines()}


@pytest.mark.parametrize("resolved_on", ["the store", "the mount"])
def test_variants_rez_would_not_cache_stay_at_their_store_path_and_run_from_there(
        tmp_path, lazyfs_mount, resolved_on):
    shop = Shop(tmp_path)
    m = lazyfs_mount({ALIAS: shop.store}, block_size=None)
    packages_path = shop.store if resolved_on == "the store" else m.repo_path(ALIAS)
    context = shop.rez.resolve(PACKAGES, [packages_path], tmp_path / "shot.rxt")

    baked, left = shop.bake(context, m.path, cache=m.cache)

    assert left == NOT_CACHABLE
    store, mounted = os.path.realpath(shop.store), os.path.join(os.path.realpath(m.path), ALIAS)
    assert locations(baked) == {name: store if name in NOT_CACHABLE else mounted
                                for name in PACKAGES}
    environ = shop.rez.source_environ(baked)
    assert {name: environ[f"REZ_{name.upper()}_ROOT"] for name in PACKAGES} == {
        name: f"{store if name in NOT_CACHABLE else mounted}/{name}/1.0" for name in PACKAGES}
    assert where_each_tool_ran(shop, baked) == {
        name: f"{store if name in NOT_CACHABLE else mounted}/{name}/1.0/bin/{name}-tool"
        for name in PACKAGES}
    # The section holds only the variants baked, so another machine seeds it.
    section = json.loads(baked.read_text())["rez_lazyfs"]
    assert {v["name"] for v in section["variants"]} == set(PACKAGES) - NOT_CACHABLE
    assert not any(entry["path"].startswith(tuple(NOT_CACHABLE)) for entry in section["listings"])
    seeded = shop.rez.lazyfs("seed", baked, "--cache", tmp_path / "elsewhere")
    assert seeded.returncode == 0, seeded.stderr


def test_force_bakes_every_variant_onto_the_mount(tmp_path, lazyfs_mount):
    shop = Shop(tmp_path)
    m = lazyfs_mount({ALIAS: shop.store}, block_size=None)
    context = shop.rez.resolve(PACKAGES, [shop.store], tmp_path / "shot.rxt")

    baked, left = shop.bake(context, m.path, "--force", cache=m.cache)

    assert left == set()
    mounted = os.path.join(os.path.realpath(m.path), ALIAS)
    assert where_each_tool_ran(shop, baked) == {
        name: f"{mounted}/{name}/1.0/bin/{name}-tool" for name in PACKAGES}


# rez's configuration -> the packages rez would not cache, so bake leaves them
CONFIGS = {
    "per package": ('default_cachable_per_package = {"plain": False}\n',
                    NOT_CACHABLE | {"plain"}),
    "per repository": ('default_cachable_per_repository = {"STORE": False}\n',
                       set(PACKAGES) - {"yescache"}),  # its own cachable = True comes first
    "default_cachable = False, as set": ("default_cachable = False\n", set(PACKAGES) - {"yescache"}),
    "default_cachable = True": ("default_cachable = True\n", {"nocache"}),  # before relocatable
    "relocatable per package": ('default_relocatable_per_package = {"plain": False}\n',
                                NOT_CACHABLE | {"plain"}),
    "relocatable per repository": ('default_relocatable_per_repository = {"STORE": False}\n',
                                   set(PACKAGES) - {"yescache"}),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_rez_default_cachable_settings_are_honoured_as_rez_honours_them(tmp_path, config):
    settings, expected = CONFIGS[config]
    shop = Shop(tmp_path, settings)
    context = shop.rez.resolve(PACKAGES, [shop.store], tmp_path / "shot.rxt")
    # rez itself, in the same configuration, on the packages in the store;
    # rez's shipped default_cachable = False (its own cache is opt-in) reads
    # as unset (None) where the configuration does not set it.
    env = shop.rez.environ([shop.store])
    if "default_cachable =" not in settings:
        unset = tmp_path / "default-cachable-unset.py"
        unset.write_text("default_cachable = None\n")
        env["REZ_CONFIG_FILE"] += os.pathsep + str(unset)
    asked = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom rez.packages import get_latest_package\n"
         "print(sorted(n for n in sys.argv[1:] if not get_latest_package(n).is_cachable))",
         *PACKAGES], env=env, capture_output=True, text=True)
    assert asked.stdout.strip() == str(sorted(expected)), asked.stderr

    _, left = shop.bake(context, tmp_path / "mnt")

    assert left == expected


def test_default_cachable_from_the_environment_is_honoured(tmp_path):
    shop = Shop(tmp_path)
    context = shop.rez.resolve(PACKAGES, [shop.store], tmp_path / "shot.rxt")
    _, left = shop.bake(context, tmp_path / "mnt", env={"REZ_DEFAULT_CACHABLE": "false"})
    assert left == set(PACKAGES) - {"yescache"}
