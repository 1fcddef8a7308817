"""A small but realistic Rez repository, generated deterministically.

`sampleapp` launches like a DCC in miniature: a wrapper script that starts
Python, imports a few hundred modules from a required package, and reads
scattered slices of a large binary asset; plus documentation files that the
launch never touches, which a whole-variant copy would still pay for.
"""
from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

ASSET_SIZE = 64 * 2**20
ASSET_SLICES = 16
SLICE_SIZE = 256 * 1024


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(path, mode)


def build_sample_repository(root: Path, modules: int = 400, untouched_files: int = 2000) -> None:
    rng = random.Random(2024)
    tools = root / "sampletools" / "1.0.0"
    _write(tools / "package.py", textwrap.dedent("""\
        name = "sampletools"
        version = "1.0.0"
        def commands():
            env.PYTHONPATH.prepend("{root}/python")
        """))
    per_package = 20
    names = []
    for n in range(modules):
        pkg = f"pkg{n // per_package:02d}"
        _write(tools / "python" / "sampletools" / pkg / "__init__.py", "")
        body = "".join(f"VALUE_{i} = {rng.randrange(10**9)}\n" for i in range(40))
        _write(tools / "python" / "sampletools" / pkg / f"mod{n:03d}.py",
               body + f"def answer():\n    return {n}\n")
        names.append(f"sampletools.{pkg}.mod{n:03d}")
    _write(tools / "python" / "sampletools" / "__init__.py", "")
    _write(tools / "python" / "sampletools" / "startup.py",
           "".join(f"import {name}\n" for name in names)
           + f"LOADED = {len(names)}\n")

    app = root / "sampleapp" / "2.1.0"
    _write(app / "package.py", textwrap.dedent("""\
        name = "sampleapp"
        version = "2.1.0"
        requires = ["sampletools-1"]
        def commands():
            env.PATH.prepend("{root}/bin")
            env.SAMPLEAPP_ASSET = "{root}/data/asset.bin"
        """))
    _write(app / "bin" / "sampleapp", textwrap.dedent(f"""\
        #!/usr/bin/env python3
        import os, sampletools.startup as s
        read = 0
        with open(os.environ["SAMPLEAPP_ASSET"], "rb") as f:
            for i in range({ASSET_SLICES}):
                f.seek((i * 7919 * {SLICE_SIZE}) % ({ASSET_SIZE} - {SLICE_SIZE}))
                read += len(f.read({SLICE_SIZE}))
        print(f"sampleapp: imported {{s.LOADED}} modules, read {{read >> 10}} KiB of its asset")
        """), mode=0o755)
    _write(app / "data" / "asset.bin", rng.randbytes(ASSET_SIZE))
    for n in range(untouched_files):
        _write(app / "share" / "doc" / f"page{n // 100:02d}" / f"topic{n:04d}.html",
               f"<p>topic {n}</p>\n" + "x" * rng.randrange(200, 4000))
