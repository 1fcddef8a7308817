"""`rez-lazyfs publish` and `keygen` (issue 11, the writing side): real
repositories on disk, real CLI runs, the image read back with cachecore.image
alone (tests/helpers/image.py) and compared with a walk of the store."""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cachecore.image.catalog import DEFAULT_CHUNK_SIZE
from cachecore.image.manifest import BadManifest
from cachecore.image.objects import object_name
from helpers.faults import ERROR_PREFIX, fault_store_fixture, lazyfs_cli_fixture, scratch_mounts_fixture
from helpers.image import ImageReader, image_objects
from helpers.mounts import LAZYFS
from helpers.trees import KiB, MiB, deterministic_bytes, write_file, write_rez_package
from helpers.users import public_tmp_fixture, throwaway_user_fixture
from helpers.walk import assert_same_tree, sha256_file, walk

FIXTURES = (lazyfs_cli_fixture, fault_store_fixture, scratch_mounts_fixture, throwaway_user_fixture,
            public_tmp_fixture)
CHUNK = DEFAULT_CHUNK_SIZE
SPARSE_SIZE = 200 * MiB + 12345
DEEP = 1100  # directory levels: more than Python's recursion limit


def publish(cli, repo: Path, dest: Path, key: Path, *args):
    result = cli.run("publish", repo, dest, "--key", key, "--json", *args, timeout=300)
    assert result.returncode == 0, result.output
    return json.loads(result.stdout)


def keypair(cli, where: Path) -> Path:
    key = where / "signing.key"
    result = cli.run("keygen", key)
    assert result.returncode == 0, result.output
    return key


def pub(key: Path) -> Path:
    return Path(f"{key}.pub")


def leftover_temporaries(image: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(image) for n in names
            if n.startswith(".tmp-")]


def hostile_repo(root: Path) -> dict:
    """Two families; names with a newline, invalid UTF-8 and 255 bytes; symlinks
    inside and outside; empty, hard-linked, special and big sparse files; a
    directory chain deeper than Python's recursion limit; entries that are not
    directories at the root and family levels."""
    version = write_rez_package(root, "fam", "1.0.0", files={
        "lib/a.txt": "alpha\n",
        "lib/multi.bin": deterministic_bytes(3 * CHUNK + 77, seed=1),
        "lib/exact.bin": deterministic_bytes(CHUNK, seed=2),
        "bin/tool": "#!/bin/sh\necho tool\n",
    }, executables=("bin/tool",))
    write_rez_package(root, "other", "2.1", files={"python/other/__init__.py": "X = 1\n"})
    write_file(root / "README", "a repository\n")          # a file at the root
    write_file(root / "fam" / "NOTES", "family notes\n")    # a file in a family directory
    os.symlink("fam", root / "alias")                        # a symlink at the root
    os.symlink("1.0.0", root / "fam" / "latest")             # a symlink in place of a version
    names = os.fsencode(version / "names")
    os.makedirs(names)
    for name in (b"new\nline.txt", b"caf\xe9-latin1", b"stray-\x80\xff", b"L" * 255):
        write_file(os.path.join(names, name), b"content of " + name)
    write_file(version / "lib" / "empty", b"")
    os.link(version / "lib" / "a.txt", version / "lib" / "a-hardlink.txt")
    os.mkfifo(version / "lib" / "fifo")
    os.chmod(version / "bin" / "tool", 0o750)
    links = version / "links"
    links.mkdir()
    for name, target in {"inside": "../lib/a.txt", "outside": "/etc/passwd",
                         "dangling": "no/such/file", "dir": "../lib",
                         "non-utf8": b"../names/caf\xe9-latin1"}.items():
        os.symlink(target, os.path.join(os.fsencode(links), name.encode()))
    sparse = version / "data" / "sparse.img"
    sparse.parent.mkdir()
    written = {0: deterministic_bytes(4 * KiB, seed=3), 77 * MiB + 5: deterministic_bytes(9000, seed=4),
               SPARSE_SIZE - 100: deterministic_bytes(100, seed=5)}
    with open(sparse, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, data in written.items():
            f.seek(offset)
            f.write(data)
    fd = os.open(version, os.O_PATH)
    try:
        for _ in range(DEEP):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_PATH, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)
    os.chmod(version / "lib", 0o750)
    return {"sparse": b"fam/1.0.0/data/sparse.img", "sparse_written": len(written)}


def remove_deep_chain(version: Path) -> None:
    """pytest's clean-up of old temporary directories recurses: undo the chain first."""
    bottom = version.joinpath(*["d"] * DEEP)
    if bottom.is_dir():
        (bottom / "bottom.txt").unlink(missing_ok=True)
        for level in range(DEEP, 0, -1):
            version.joinpath(*["d"] * level).rmdir()


def depth(path: bytes) -> int:
    return 0 if not path else path.count(b"/") + 1


# -- publishing a hostile tree and reading it back ------------------------------------
def test_publish_hostile_tree_reads_back_as_the_store(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    try:
        facts = hostile_repo(repo)
        check_hostile_tree_published(tmp_path, lazyfs_cli, repo, image, facts)
    finally:
        remove_deep_chain(repo / "fam" / "1.0.0")


def check_hostile_tree_published(tmp_path, lazyfs_cli, repo, image, facts):
    key = keypair(lazyfs_cli, tmp_path)
    # under a umask that would keep the files from a web server running as another user
    run = subprocess.run([str(LAZYFS), "publish", repo, image, "--key", key, "--json"],
                         capture_output=True, env=lazyfs_cli.env(), umask=0o077, timeout=300)
    assert run.returncode == 0 and not run.stderr, run.stderr
    summary = json.loads(run.stdout)

    reader = ImageReader(image, pub(key))  # signature, every catalog and object verified
    assert reader.manifest.revision == summary["revision"] == 1
    assert_same_tree(walk(repo), reader.walk())
    assert reader.sha256(facts["sparse"]) == sha256_file(repo / os.fsdecode(facts["sparse"]))
    # every attribute as lstat gives it (the access time pinned to the mtime)
    for relpath, attr in reader.attrs.items():
        st = os.lstat(os.path.join(os.fsencode(repo), relpath))
        assert (attr.mode, attr.size, attr.mtime_ns, attr.ctime_ns, attr.uid, attr.gid, attr.ino,
                attr.nlink, attr.atime_ns) == (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                               st.st_uid, st.st_gid, st.st_ino, st.st_nlink,
                                               st.st_mtime_ns), relpath
        if attr.is_link:
            assert attr.target == os.readlink(os.path.join(os.fsencode(repo), relpath))
    st = os.stat(repo)
    assert (reader.root.mode, reader.root.mtime_ns, reader.root.ino) == (st.st_mode, st.st_mtime_ns,
                                                                         st.st_ino)
    files = [p for p, a in reader.attrs.items() if a.is_file]
    assert summary["files"] == len(files) and summary["files_read"] == len(files) - 1  # not the empty one
    assert summary["bytes"] == sum(reader.attrs[p].size for p in files)

    # catalogs cut as the format says: the root, one per family, one per version
    levels = {c.level: [] for c in reader.catalogs}
    for c in reader.catalogs:
        levels[c.level].append(c.catalog)
    families = sorted(p for p, a in reader.attrs.items() if a.is_dir and depth(p) == 1)
    versions = sorted(p for p, a in reader.attrs.items() if a.is_dir and depth(p) == 2)
    assert families == [b"fam", b"other"] and versions == [b"fam/1.0.0", b"other/2.1"]
    (root,) = levels["root"]
    assert list(root.listings) == [b""] and sorted(root.children) == families
    assert sorted(root.files) == [b"README"]
    assert sorted(p for c in levels["family"] for p in c.children) == versions
    for c in levels["family"]:
        assert {depth(p) for p in c.listings} == {1, 2}
    assert b"fam/1.0.0/package.py" in next(c for c in levels["family"] if b"fam" in c.listings).files
    for c in levels["payload"]:
        assert all(depth(p) > 2 for p in c.listings)
    assert summary["catalogs"] == len(reader.catalogs) == 1 + len(families) + len(versions)

    # the sparse file's zero chunks are one object; the image is small
    sparse_chunks = reader.files[facts["sparse"]].chunks
    assert len(sparse_chunks) == -(-SPARSE_SIZE // CHUNK)
    assert len(set(sparse_chunks)) <= facts["sparse_written"] + 1
    image_bytes = sum(e.stat().st_size for d in os.scandir(image / "objects") for e in os.scandir(d))
    assert image_bytes < 2 * MiB
    assert summary["objects_new"] == len(image_objects(image)) == len(reader.referenced_objects())
    # served as plain files by a web server running as another user
    for dirpath, dirnames, filenames in os.walk(image):
        for name in dirnames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o755
        for name in set(filenames) - {".publish-lock"}:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o644
    assert not leftover_temporaries(image)


# -- publishing again ---------------------------------------------------------------
def test_republish_unchanged_reads_and_writes_nothing(tmp_path, lazyfs_cli, fault_store):
    source = tmp_path / "repo"
    write_rez_package(source, "fam", "1.0", files={
        f"lib/f{n:02d}.bin": deterministic_bytes(n * 10 * KiB + 1, seed=n) for n in range(30)})
    store = fault_store(source)  # counts the reads that reach the repository
    image = tmp_path / "image"
    key = keypair(lazyfs_cli, tmp_path)
    first = publish(lazyfs_cli, store.path, image, key)
    before = image_objects(image)
    root_before = ImageReader(image, pub(key)).manifest.root
    store.set()  # reset the read count
    again = publish(lazyfs_cli, store.path, image, key)
    reader = ImageReader(image, pub(key))
    assert store.counts()["reads"] == 0, "unchanged files were read again"
    assert again["files_read"] == 0 and again["objects_new"] == 0 and again["bytes_new"] == 0
    assert again["objects_existing"] == first["objects_new"] == len(before)
    assert again["revision"] == reader.manifest.revision == 2
    assert reader.manifest.root == root_before, "the same tree made different catalogs"
    assert image_objects(image) == before
    assert_same_tree(walk(source), reader.walk())


def test_republish_with_a_version_sharing_95_percent_adds_only_its_new_objects(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    files = {f"lib/m{n:03d}.bin": deterministic_bytes((n % 7) * 50 * KiB + 100 + n, seed=100 + n)
             for n in range(100)}
    write_rez_package(repo, "daily", "1.0.0", files=files)
    key = keypair(lazyfs_cli, tmp_path)
    first = publish(lazyfs_cli, repo, image, key)
    before = image_objects(image)
    assert first["objects_new"] == len(before)

    # the next daily build: a copy of yesterday's (new inodes, same bytes) with 5 files changed
    shutil.copytree(repo / "daily" / "1.0.0", repo / "daily" / "1.0.1")
    write_file(repo / "daily" / "1.0.1" / "package.py", "name = 'daily'\nversion = '1.0.1'\n")
    changed = sorted(files)[::20]
    assert len(changed) == 5
    expected = {object_name(b"name = 'daily'\nversion = '1.0.1'\n")}
    for n, rel in enumerate(changed):
        content = deterministic_bytes(len(files[rel]) + 3, seed=900 + n)
        write_file(repo / "daily" / "1.0.1" / rel, content)
        expected |= {object_name(content[i:i + CHUNK]) for i in range(0, len(content), CHUNK)}
    assert not expected & before
    second = publish(lazyfs_cli, repo, image, key)
    added = image_objects(image) - before
    catalogs = 3  # the new version's payload catalog, its family's and the root's
    assert len(added) == second["objects_new"] == len(expected) + catalogs
    assert expected <= added
    assert image_objects(image) >= before, "an object of the previous revision went away"
    reader = ImageReader(image, pub(key))
    assert reader.manifest.revision == 2
    assert_same_tree(walk(repo), reader.walk())
    assert second["bytes_new"] < 0.1 * second["bytes"]


def test_republish_after_the_previous_revision_expired(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    write_rez_package(repo, "fam", "1.0")
    key = keypair(lazyfs_cli, tmp_path)
    publish(lazyfs_cli, repo, image, key, "--valid-for", "1s", "--ttl", "5")
    first = (image / "manifest").read_bytes()
    time.sleep(2.1)
    with pytest.raises(BadManifest, match="expired"):
        ImageReader(image, pub(key))
    assert publish(lazyfs_cli, repo, image, key)["revision"] == 2
    reader = ImageReader(image, pub(key))
    assert reader.manifest.ttl == 61 and reader.manifest.expires - reader.manifest.published == 30 * 86400
    assert (image / "manifest").read_bytes() != first


# -- a publish killed, a file changing ------------------------------------------------
def count_objects(image: Path) -> int:
    return len(image_objects(image))


def wait_for_objects(image: Path, at_least: int, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (n := count_objects(image)) < at_least:
        assert proc.poll() is None, f"publish ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, f"only {n} objects after {timeout} s"
        time.sleep(0.01)
    return n


def start_publish(cli, repo: Path, image: Path, key: Path) -> subprocess.Popen:
    return subprocess.Popen([str(LAZYFS), "publish", str(repo), str(image), "--key", str(key)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=cli.env())


def test_publish_killed_midway_leaves_the_previous_revision_complete(tmp_path, lazyfs_cli, fault_store):
    source = tmp_path / "repo"
    write_rez_package(source, "app", "1.0", files={"lib/small.py": "x = 1\n"})
    store = fault_store(source)
    image = tmp_path / "image"
    key = keypair(lazyfs_cli, tmp_path)
    publish(lazyfs_cli, store.path, image, key)
    manifest = (image / "manifest").read_bytes()
    revision_1 = walk(source)
    before = count_objects(image)

    big = deterministic_bytes(64 * MiB + 5, seed=42)  # 513 chunks, none compressible
    write_file(source / "app" / "2.0" / "bin" / "big.bin", big)
    write_file(source / "app" / "2.0" / "package.py", "name = 'app'\nversion = '2.0'\n")
    store.set(delay=0.01)  # each 128K read of the store takes 10 ms: the publish takes > 5 s
    proc = start_publish(lazyfs_cli, store.path, image, key)
    try:
        wait_for_objects(image, before + 20, proc)
        busy = lazyfs_cli.run("publish", store.path, image, "--key", key)  # meanwhile, a second one
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert busy.returncode == 1 and "another publish" in busy.one_line_error()
    left = count_objects(image)
    assert before + 20 <= left < before + 513

    # the image still serves revision 1, complete: every object it names present and valid
    assert (image / "manifest").read_bytes() == manifest
    reader = ImageReader(image, pub(key))
    assert reader.manifest.revision == 1
    assert_same_tree(revision_1, reader.walk())
    assert all(reader.object(name) is not None for name in reader.referenced_objects())

    # the next publish completes the job, using what the killed one wrote
    store.set()
    done = publish(lazyfs_cli, store.path, image, key)
    assert done["revision"] == 2
    assert done["objects_existing"] >= left - before
    reader = ImageReader(image, pub(key))
    assert_same_tree(walk(source), reader.walk())
    assert reader.sha256(b"app/2.0/bin/big.bin") == sha256_file(source / "app/2.0/bin/big.bin")
    assert not leftover_temporaries(image)


def rewrite_keeping_mtime(path: Path) -> None:
    st = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"changed!", 3 * MiB)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def replace_by_rename(path: Path) -> None:
    tmp = path.with_name("replacement")
    tmp.write_bytes(deterministic_bytes(os.path.getsize(path), seed=77))
    os.rename(tmp, path)


CHANGES = {"rewritten in place, mtime restored": rewrite_keeping_mtime,
           "replaced by a rename": replace_by_rename,
           "deleted": os.unlink}


@pytest.mark.parametrize("change", CHANGES)
def test_a_file_changing_while_published_fails_cleanly(tmp_path, lazyfs_cli, fault_store, change):
    source = tmp_path / "repo"
    write_rez_package(source, "app", "1.0")
    store = fault_store(source)
    image = tmp_path / "image"
    key = keypair(lazyfs_cli, tmp_path)
    publish(lazyfs_cli, store.path, image, key)
    manifest = (image / "manifest").read_bytes()
    before = count_objects(image)
    victim = os.path.join(os.fsencode(source), b"app/1.0/bin/big\nfile.bin")
    write_file(victim, deterministic_bytes(16 * MiB, seed=8))

    store.set(delay=0.02)
    proc = start_publish(lazyfs_cli, store.path, image, key)
    try:
        wait_for_objects(image, before + 5, proc)
        CHANGES[change](Path(os.fsdecode(victim)))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "app/1.0/bin/big\\nfile.bin changed while it was published; publish again" in lines[0]
    assert "still serves revision 1" in lines[0]
    assert (image / "manifest").read_bytes() == manifest
    assert ImageReader(image, pub(key)).manifest.revision == 1

    store.set()
    assert publish(lazyfs_cli, store.path, image, key)["revision"] == 2
    assert_same_tree(walk(source), ImageReader(image, pub(key)).walk())


# -- what cannot be read ------------------------------------------------------------
@pytest.mark.parametrize("what", ["file", "directory"])
def test_an_unreadable_file_or_directory_fails_with_one_line(public_tmp, throwaway_user, what):
    repo, image, key = public_tmp / "repo", public_tmp / "image", public_tmp / "k"
    write_rez_package(repo, "fam", "1.0", files={"lib/secret.txt": "s\n", "doc/readme": "r\n"})
    subprocess.run([str(LAZYFS), "keygen", key], check=True, capture_output=True)
    image.mkdir()
    subprocess.run(["chown", "-R", f"{throwaway_user.uid}:{throwaway_user.gid}", repo, image, key,
                    pub(key)], check=True)
    argv = [LAZYFS, "publish", repo, image, "--key", key]
    first = throwaway_user.run(argv)
    assert first.returncode == 0, first.stderr
    manifest = (image / "manifest").read_bytes()

    target = repo / "fam/1.0" / ("lib/secret.txt" if what == "file" else "doc")
    target.chmod(0)
    result = throwaway_user.run(argv)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
    assert f"{target}: Permission denied" in lines[0] and "still serves revision 1" in lines[0]
    assert (image / "manifest").read_bytes() == manifest
    assert not leftover_temporaries(image)


def test_a_full_image_disk_fails_with_one_line_and_keeps_the_revision(tmp_path, lazyfs_cli,
                                                                      scratch_mounts):
    repo = tmp_path / "repo"
    write_rez_package(repo, "fam", "1.0", files={"lib/small.bin": deterministic_bytes(KiB, seed=1)})
    image = scratch_mounts.tmpfs(tmp_path / "disk", "4m") / "image"
    key = keypair(lazyfs_cli, tmp_path)
    publish(lazyfs_cli, repo, image, key)
    manifest = (image / "manifest").read_bytes()
    write_file(repo / "fam/2.0/lib/big.bin", deterministic_bytes(8 * MiB, seed=2))  # does not fit

    result = lazyfs_cli.run("publish", repo, image, "--key", key)
    line = result.one_line_error()
    assert result.returncode == 1 and "No space left on device" in line
    assert "still serves revision 1" in line
    assert (image / "manifest").read_bytes() == manifest
    assert not leftover_temporaries(image)
    assert_same_tree(walk(repo / "fam/1.0"), ImageReader(image, pub(key)).walk_under(b"fam/1.0"))


def test_bad_arguments_fail_with_one_line_and_publish_nothing(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    write_rez_package(repo, "fam", "1.0")
    key = keypair(lazyfs_cli, tmp_path)
    other_keys = tmp_path / "other"
    other_keys.mkdir()
    other = keypair(lazyfs_cli, other_keys)
    stranger = tmp_path / "stranger"
    write_file(stranger / "notes.txt", "not an image\n")

    cases = {
        "a missing repository": ((tmp_path / "nope", image, key), "No such file or directory"),
        "a repository that is a file": ((repo / "fam/1.0/package.py", image, key), "not a directory"),
        "a missing key": ((repo, image, tmp_path / "no.key"), "cannot read the key"),
        "the public key as the key": ((repo, image, pub(key)), "is not a rez-lazyfs signing key"),
        "the image inside the repository": ((repo, repo / "img", key), "inside the repository"),
        "a directory that is not an image": ((repo, stranger, key), "holds files but no image"),
    }
    for case, ((r, d, k), expected) in cases.items():
        result = lazyfs_cli.run("publish", r, d, "--key", k)
        line = result.one_line_error()
        assert result.returncode == 1 and expected in line, (case, line)
    assert not (repo / "img").exists() and sorted(os.listdir(stranger)) == ["notes.txt"]
    result = lazyfs_cli.run("publish", repo, image, "--key", key, "--valid-for", "soon")
    assert "invalid duration" in result.one_line_error()

    publish(lazyfs_cli, repo, image, key)
    manifest = (image / "manifest").read_bytes()
    result = lazyfs_cli.run("publish", repo, image, "--key", other)
    line = result.one_line_error()
    assert f"{image}/manifest does not verify with the key {other}" in line and "another key" in line
    assert (image / "manifest").read_bytes() == manifest


# -- keygen ----------------------------------------------------------------------------
def test_keygen_makes_a_pair_and_never_overwrites(tmp_path, lazyfs_cli):
    key = keypair(lazyfs_cli, tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub(key).is_file()
    secret = key.read_bytes()
    result = lazyfs_cli.run("keygen", key)
    assert result.returncode == 1 and "already exists" in result.one_line_error()
    assert key.read_bytes() == secret

    lonely = tmp_path / "lonely.key"
    pub(lonely).write_text("someone's public key\n")
    result = lazyfs_cli.run("keygen", lonely)
    assert result.returncode == 1 and f"{lonely}.pub already exists" in result.one_line_error()
    assert not lonely.exists()

    result = lazyfs_cli.run("keygen", tmp_path / "no" / "such" / "dir" / "k")
    assert result.returncode == 1 and "No such file or directory" in result.one_line_error()


# -- output -------------------------------------------------------------------------
def test_progress_on_a_terminal_one_summary_line_otherwise(tmp_path, lazyfs_cli):
    repo, image = tmp_path / "repo", tmp_path / "image"
    write_rez_package(repo, "fam", "1.0", files={
        f"f{n:04d}.bin": deterministic_bytes(64 * KiB, seed=n) for n in range(600)})
    key = keypair(lazyfs_cli, tmp_path)
    controller, terminal = pty.openpty()
    try:
        with subprocess.Popen([str(LAZYFS), "publish", repo, image, "--key", key],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
                              env=lazyfs_cli.env()) as proc:
            os.close(terminal)
            terminal = None
            shown = b""
            while True:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's other end is closed and drained
                    break
                if not data:
                    break
                shown += data
            stdout = proc.stdout.read()
    finally:
        os.close(controller)
        if terminal is not None:
            os.close(terminal)
    assert proc.returncode == 0, shown
    assert b"files " in shown and b"new, " in shown and b"already there" in shown, shown
    assert stdout.decode().startswith("published revision 1 of ")

    result = lazyfs_cli.run("publish", repo, image, "--key", key)
    assert result.returncode == 0 and result.stderr == ""
    (line,) = result.stdout.splitlines()
    assert line.startswith("published revision 2 of ") and "0 new object(s)" in line
