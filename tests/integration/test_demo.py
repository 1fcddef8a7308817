"""The main job README.md names (`bash .ci/demo`: `rez-lazyfs demo`), run for real."""
from __future__ import annotations

import re
import subprocess

from helpers.mounts import VENV_BIN, is_mounted


def test_the_demo_launches_cold_and_warm_and_prints_its_table(tmp_path):
    workdir = tmp_path / "demo"
    try:
        result = subprocess.run([VENV_BIN / "rez-lazyfs", "demo", "--workdir", workdir, "--keep"],
                                capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    finally:
        if is_mounted(workdir / "mnt"):  # the demo unmounts; a failed one may not have
            subprocess.run(["fusermount3", "-u", "-z", workdir / "mnt"], capture_output=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    rows = {}
    for line in result.stdout.splitlines():
        found = re.match(r"(direct from the store|rez-lazyfs [^0-9]+?)\s+([0-9.]+)\s+(\S+)\s+(\S+)$", line)
        if found:
            rows[found[1].strip()] = found.groups()[1:]
    assert set(rows) == {"direct from the store", "rez-lazyfs cold (empty cache)",
                         "rez-lazyfs warm (same mount)",
                         "rez-lazyfs warm (remounted, disk cache)"}, result.stdout
    cold_reads, cold_mib = int(rows["rez-lazyfs cold (empty cache)"][1]), \
        float(rows["rez-lazyfs cold (empty cache)"][2])
    assert cold_reads > 0 and cold_mib > 0           # the cold launch read the store
    assert rows["rez-lazyfs warm (same mount)"][1:] == ("0", "0.0")  # the warm one did not
    assert not is_mounted(workdir / "mnt")
