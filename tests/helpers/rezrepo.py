"""Real Rez package repositories and the real rez command line, for tests.

``build_store`` lays out a filesystem repository the way rez-build/rez-release
install one (``<name>/<version>/package.py`` plus payload), from a flat
``{relpath: content}`` description, so a test shows its whole repository in
one place. ``Rez`` runs the rez tools from the venv (rez from PyPI) with a
minimal config of our own, so nothing from the user's Rez setup leaks in.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REZ_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Symlink:
    """A symlink entry for build_store; *target* is written verbatim."""

    target: str


# build_store entry for an (empty) directory: the key ends with "/".
DIRECTORY = None


def hashed_variant_dir(variant_requires: list[str]) -> str:
    """The directory rez-build installs a variant of a `hashed_variants`
    package into: the SHA-1 of str(list(map(str, requires)))."""
    return hashlib.sha1(str(list(map(str, variant_requires))).encode()).hexdigest()


def build_store(root: Path, entries: dict[str, str | bytes | Symlink | None]) -> None:
    """Create the repository *root* from *entries*, relpath -> content:

    * ``str``: a text file, dedented (so definitions can be indented in the
      test); executable (0755) when it starts with ``#!``, else 0644;
    * ``bytes``: a data file, written as is, 0644;
    * ``Symlink(target)``: a symlink;
    * ``DIRECTORY`` (None), with a key ending in ``/``: an empty directory
      (say, the payload directory of a variant with no files).
    """
    for relpath, content in entries.items():
        path = root / relpath
        if content is DIRECTORY:
            assert relpath.endswith("/"), f"{relpath!r}: a directory entry's key ends with '/'"
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Symlink):
            path.symlink_to(content.target)
        elif isinstance(content, bytes):
            path.write_bytes(content)
            path.chmod(0o644)
        else:
            text = textwrap.dedent(content).lstrip()
            path.write_text(text)
            path.chmod(0o755 if text.startswith("#!") else 0o644)


class Rez:
    """Runs the real rez command line tools with a minimal config of our own."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config = workdir / "rezconfig.py"
        self.config.write_text(textwrap.dedent(f"""
            packages_path = []
            local_packages_path = "{workdir}/local-packages"
            release_packages_path = "{workdir}/release-packages"
            implicit_packages = []
        """))

    def environ(self, packages_path: list[Path]) -> dict[str, str]:
        # No REZ_* from the caller: each would override a config setting.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REZ_")}
        env.update(
            REZ_CONFIG_FILE=str(self.config),
            REZ_DISABLE_HOME_CONFIG="1",
            REZ_PACKAGES_PATH=os.pathsep.join(map(str, packages_path)),
        )
        return env

    def lazyfs(self, *args, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """One non-daemon `rez-lazyfs` command, with this rez config (bake uses
        rez's API), no user configuration of either tool, and *env* on top."""
        from helpers.mounts import LAZYFS

        return subprocess.run([str(LAZYFS), *map(str, args)], env=self.lazyfs_environ(env),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def lazyfs_environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment `lazyfs` runs its commands in (*extra* on top)."""
        env = self.environ([self.workdir / "no-packages-here"])
        env.update(extra or {})
        xdg = self.workdir / "xdg"
        env.update(XDG_CONFIG_HOME=str(xdg / "config"), XDG_CACHE_HOME=str(xdg / "cache"),
                   XDG_DATA_HOME=str(xdg / "data"), XDG_STATE_HOME=str(xdg / "state"))
        return env

    def resolve(self, request: list[str], packages_path: list[Path], out: Path) -> Path:
        self._run(["rez-env", *request, "--output", str(out)], packages_path)
        return out

    def source(self, context: Path, command: list[str]) -> subprocess.CompletedProcess:
        # Nothing to search: sourcing a context must not need a package path.
        return self._run(["rez-env", "--input", str(context), "--", *command],
                         [self.workdir / "no-packages-here"], check=False)

    def source_environ(self, context: Path) -> dict[str, str]:
        result = self.source(context, ["env", "-0"])
        assert result.returncode == 0, result.stderr
        return dict(item.split("=", 1) for item in result.stdout.split("\0") if item)

    def _run(self, argv: list[str], packages_path: list[Path], check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(REZ_BIN / argv[0]), *argv[1:]]
        assert os.access(argv[0], os.X_OK), f"{argv[0]} missing: run .ci/setup"
        result = subprocess.run(argv, env=self.environ(packages_path), capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, result.stderr
        return result
