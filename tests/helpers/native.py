"""A small native "package payload" built with gcc: a program linked against
a shared library of its own package (found through an $ORIGIN rpath), which
also dlopen()s a plugin and mmap()s a data file, both by paths relative to
the program itself. That is how relocatable DCC packages find their pieces,
and it exercises exec, the dynamic loader's mmap of libraries, dlopen and
plain mmap through the mount."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

LIBGREET_C = r"""
const char *greet_message(void) { return "hello from libgreet"; }
"""

PLUGIN_C = r"""
int plugin_answer(void) { return 42; }
"""

GREETER_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

const char *greet_message(void);

int main(void) {
    char exe[PATH_MAX], path[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n < 0) { perror("readlink /proc/self/exe"); return 2; }
    exe[n] = '\0';
    printf("exe: %s\n", exe);
    const char *bindir = dirname(exe);

    /* Linked library, resolved by ld.so through DT_RUNPATH $ORIGIN/../lib. */
    Dl_info info;
    if (!dladdr((void *)greet_message, &info)) { fprintf(stderr, "dladdr failed\n"); return 3; }
    printf("linked: %s\n", greet_message());
    printf("linked-from: %s\n", info.dli_fname);

    /* A plugin, dlopen()ed by a path relative to the program. */
    snprintf(path, sizeof path, "%s/../lib/plugins/libplugin.so", bindir);
    void *plugin = dlopen(path, RTLD_NOW);
    if (!plugin) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 4; }
    int (*answer)(void) = (int (*)(void))dlsym(plugin, "plugin_answer");
    if (!answer) { fprintf(stderr, "dlsym: %s\n", dlerror()); return 5; }
    printf("plugin: %d from %s\n", answer(), path);

    /* A data file, mmap()ed whole and hashed (FNV-1a 64). */
    snprintf(path, sizeof path, "%s/../share/data.bin", bindir);
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); return 6; }
    struct stat st;
    if (fstat(fd, &st) < 0) { perror("fstat"); return 7; }
    const unsigned char *p = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); return 8; }
    uint64_t h = 1469598103934665603ULL;
    for (off_t i = 0; i < st.st_size; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    printf("mmap: %lld %016llx\n", (long long)st.st_size, (unsigned long long)h);
    munmap((void *)p, st.st_size);
    close(fd);
    dlclose(plugin);
    return 0;
}
"""


def fnv1a64(data: bytes) -> int:
    h = 1469598103934665603
    for byte in data:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass
class NativePayload:
    program: str  # relpaths inside the version directory
    library: str
    plugin: str
    data: str
    data_bytes: bytes

    def expected_mmap_line(self) -> str:
        return f"mmap: {len(self.data_bytes)} {fnv1a64(self.data_bytes):016x}"


def build_native_payload(version_dir: Path, build_dir: Path, data: bytes) -> NativePayload:
    """Compile bin/greeter, lib/libgreet.so and lib/plugins/libplugin.so into
    *version_dir* (sources stay in *build_dir*) and write share/data.bin."""
    payload = NativePayload(
        program="bin/greeter", library="lib/libgreet.so", plugin="lib/plugins/libplugin.so",
        data="share/data.bin", data_bytes=data,
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    for rel in (payload.program, payload.library, payload.plugin, payload.data):
        (version_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (version_dir / payload.data).write_bytes(data)
    sources = {"libgreet.c": LIBGREET_C, "plugin.c": PLUGIN_C, "greeter.c": GREETER_C}
    for name, text in sources.items():
        (build_dir / name).write_text(text)

    def gcc(*args: str | Path) -> None:
        result = subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True, cwd=build_dir)
        assert result.returncode == 0, f"gcc {' '.join(map(str, args))}:\n{result.stderr}"

    gcc("-shared", "-fPIC", "-o", version_dir / payload.library, "libgreet.c")
    gcc("-shared", "-fPIC", "-o", version_dir / payload.plugin, "plugin.c")
    # '$ORIGIN' reaches the linker verbatim (no shell in between).
    gcc("-o", version_dir / payload.program, "greeter.c",
        "-L", version_dir / "lib", "-lgreet", "-Wl,-rpath,$ORIGIN/../lib", "-ldl")
    return payload
