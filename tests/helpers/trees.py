"""Builders for store trees used by the integration tests."""

from __future__ import annotations

import os
import random
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Just over 4 GiB and not a multiple of any plausible block size, so offsets
# beyond 2**32 and a partial last block are both exercised.
SPARSE_FILE_SIZE = 4 * GiB + 3 * 64 * KiB + 123


def deterministic_bytes(size: int, seed: int) -> bytes:
    """Incompressible, reproducible content: a block mixed up with another one
    or served at the wrong offset shows up as a sha256 mismatch."""
    return random.Random(seed).randbytes(size)


def write_file(path: Path | bytes, content: bytes | str, mode: int = 0o644) -> None:
    """Create *path* (and its parents) with *content* and exactly *mode*
    (explicit chmod, so the umask of whoever runs the tests doesn't matter)."""
    if isinstance(content, str):
        content = content.encode()
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, mode)


@dataclass
class TrickyTree:
    """A store tree full of edge cases; relpaths are bytes, relative to root."""

    root: Path
    sparse_file: bytes
    sparse_data: dict[int, bytes]  # offset -> bytes written in the sparse file
    crowded_dir: bytes
    crowded_entries: int
    empty_file: bytes
    files_by_mode: dict[int, bytes]
    symlinks: dict[bytes, bytes] = field(default_factory=dict)  # relpath -> target
    regular_files: list[bytes] = field(default_factory=list)


def build_tricky_tree(
    root: Path,
    *,
    crowded_entries: int = 20_000,
    sparse_size: int = SPARSE_FILE_SIZE,
) -> TrickyTree:
    """Build a tree that exercises what a byte-for-byte mirror can get wrong.

    Nested directories, every common file mode, an empty file, a sparse file
    larger than 4 GiB (offset arithmetic beyond 32 bits), one directory with
    *crowded_entries* entries (readdir paging), names with spaces, non-ASCII
    UTF-8 and bytes that are not UTF-8 at all, a 255-byte name (the NAME_MAX
    limit), and relative, absolute and dangling symlinks.
    """
    broot = os.fsencode(root)
    os.makedirs(broot, exist_ok=True)

    def p(rel: bytes) -> bytes:
        return os.path.join(broot, rel)

    regular: list[bytes] = []

    def add(rel: bytes, content: bytes | str, mode: int = 0o644) -> bytes:
        write_file(p(rel), content, mode)
        regular.append(rel)
        return rel

    # Nested directories, with content spanning several 64K blocks at depth.
    add(b"a/b/c/d/deep.txt", "deep inside\n")
    add(b"a/b/c/d/multi-block.bin", deterministic_bytes(5 * 64 * KiB + 17, seed=1))
    add(b"a/top.txt", "top\n")
    add(b".hidden/.dotfile", "hidden\n")

    files_by_mode = {
        0o644: add(b"modes/rw-r--r--.txt", "0644\n", 0o644),
        0o755: add(b"modes/rwxr-xr-x.sh", "#!/bin/sh\necho 0755\n", 0o755),
        0o600: add(b"modes/rw-------.txt", "0600\n", 0o600),
        0o444: add(b"modes/r--r--r--.txt", "0444\n", 0o444),
    }
    empty_file = add(b"modes/empty", b"")

    # Names: spaces, non-ASCII UTF-8, invalid UTF-8 (latin-1 bytes and a
    # stray continuation byte), and the longest name a filesystem allows.
    add(b"names/with space/file with  two spaces.txt", "spaces\n")
    add("names/ünïcødé/日本語ファイル.txt".encode(), "utf-8\n")
    add(b"names/latin1-caf\xe9/na\xefve.txt", "latin-1 bytes\n")
    add(b"names/stray-\x80\xff-bytes", "not utf-8\n")
    add(b"names/" + b"L" * 255, "NAME_MAX\n")

    symlinks = {
        b"links/relative-to-file": b"../a/b/c/d/deep.txt",
        b"links/relative-to-dir": b"../a/b",
        b"links/absolute-outside-store": b"/etc/hostname",
        b"links/dangling": b"does/not/exist",
        b"links/to-non-utf8": b"../names/latin1-caf\xe9/na\xefve.txt",
        b"links/self-dir-dot": b".",
    }
    os.makedirs(p(b"links"), exist_ok=True)
    for rel, target in symlinks.items():
        os.symlink(target, p(rel))

    # A sparse file over 4 GiB: patterns straddle 2**31 and 2**32 (where
    # signed and unsigned 32-bit offsets wrap) and end exactly at EOF. Each
    # pattern is distinct, so an offset that wraps reads the wrong one.
    sparse_file = b"sparse/over-4GiB.img"
    sparse_data: dict[int, bytes] = {}
    if sparse_size:
        sparse_data = {
            0: deterministic_bytes(64 * KiB, seed=10),
            2**31 - 1000: deterministic_bytes(4 * KiB, seed=11),
            2**32 - 1000: deterministic_bytes(4 * KiB, seed=12),
            2**32 + 64 * KiB: deterministic_bytes(4 * KiB, seed=13),
        }
        sparse_data[sparse_size - 5000] = deterministic_bytes(5000, seed=14)
        os.makedirs(p(b"sparse"), exist_ok=True)
        with open(p(sparse_file), "wb") as f:
            f.truncate(sparse_size)
            for offset, data in sparse_data.items():
                f.seek(offset)
                f.write(data)
        os.chmod(p(sparse_file), 0o644)
        regular.append(sparse_file)

    # Many entries in one directory: the kernel pages readdir through the
    # daemon in small batches, so offsets/cookies must be right. Names vary
    # in length so batch boundaries fall at different byte positions.
    crowded_dir = b"crowded"
    os.makedirs(p(crowded_dir), exist_ok=True)
    for i in range(crowded_entries):
        name = b"entry-%05d%s" % (i, b"x" * (i % 23))
        fd = os.open(os.path.join(p(crowded_dir), name), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)

    os.makedirs(p(b"empty-dir"), exist_ok=True)

    # Directory modes last: 0555 and 0700 directories must be mirrored too.
    os.chmod(p(b"modes"), 0o555)
    os.chmod(p(b"a/b"), 0o700)
    os.chmod(p(b"names/with space"), 0o750)

    return TrickyTree(
        root=root,
        sparse_file=sparse_file if sparse_size else b"",
        sparse_data=sparse_data,
        crowded_dir=crowded_dir,
        crowded_entries=crowded_entries,
        empty_file=empty_file,
        files_by_mode=files_by_mode,
        symlinks=symlinks,
        regular_files=regular,
    )


def write_rez_package(
    repo: Path,
    name: str,
    version: str,
    *,
    commands: str = "",
    files: dict[str, bytes | str] | None = None,
    executables: tuple[str, ...] = (),
) -> Path:
    """Write REPO/NAME/VERSION/package.py by hand (a Rez filesystem repository
    layout) plus payload *files* (relpath -> content); relpaths listed in
    *executables* get mode 0755. Returns the version directory."""
    version_dir = repo / name / version
    body = f"name = {name!r}\nversion = {version!r}\n"
    if commands:
        body += "\ndef commands():\n" + textwrap.indent(textwrap.dedent(commands).strip(), "    ") + "\n"
    write_file(version_dir / "package.py", body)
    for rel, content in (files or {}).items():
        write_file(version_dir / rel, content, 0o755 if rel in executables else 0o644)
    return version_dir
