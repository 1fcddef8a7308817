"""Read, rebase and write rez resolved contexts (.rxt files).

A context names each resolved variant by a handle whose `location` is the
repository it came from; rez re-reads the variant's package definition from
there when the context is sourced and derives `{root}` from it. Rebasing a
context onto the mount therefore means rewriting those locations. The format
and rez's behaviour are described in docs/rxt-format.md.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .config import is_url
from .errors import UserError

# rez 3.x writes "4.9". ResolvedContext.from_dict only compares the major
# number, and handles older than 4.0 use a different layout.
SUPPORTED_SERIALIZE_MAJOR = 4

# The keys ResolvedContext.from_dict (rez 3.4) reads without a default: rez
# cannot load a document that lacks any of them.
REQUIRED_KEYS = frozenset({
    "serialize_version", "resolved_packages", "package_paths", "timestamp",
    "building", "caching", "implicit_packages", "package_requests",
    "rez_version", "rez_path", "user", "host", "platform", "arch", "os",
    "created", "status", "failure_description", "solve_time", "load_time",
    "graph",
})

# The handle variables rez's repository manager needs to find a variant (a
# handle is {"key": <resource type>, "variables": {...}}).
REQUIRED_HANDLE_VARIABLES = ("name", "repository_type", "location")


@dataclass(frozen=True)
class ContextVariant:
    """One resolved variant of a context, as rez sees it."""

    name: str
    version: str
    repository_type: str
    location: str
    index: int | None  # position in the package's `variants` list; None if it has none
    subpath: str | None  # root relative to the package's version directory; None if no variants
    root: str | None  # what rez binds to {root} and REZ_<NAME>_ROOT; None for combined packages
    cachable: bool  # rez's Package.is_cachable: may the payload move from its repository

    @property
    def qualified_name(self) -> str:
        return _qualified_name(self.name, self.version)


def load_context(path: str) -> dict:
    """Read the JSON context rez wrote at *path* and check rez could load it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"context file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read context file {path}: {e.strerror}") from None

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a rez context: it is not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"{path} is empty")

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if _is_cut_short(text, e):
            last_line = text.count("\n") + 1
            raise UserError(f"{path} is truncated: the context stops at line {last_line}") from None
        raise UserError(f"{path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None

    _check_context(doc, path)
    return doc


def rebase_context(doc: dict, repos: dict[str, str], mountpoint: str,
                   over: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """Point the variants of *doc* that live in a mirrored store at the mount.

    *repos* maps alias -> store path; a repository at or below a store path is
    moved to the same place below `<mountpoint>/<alias>`, or below
    `over[alias]` for a repository under a transparent mount (its store's own
    path, canonical: a context resolved against the store keeps its
    locations). *mountpoint* may be "" when every repository is mounted over.
    Returns the rebased copy (with rez's package cache turned off) and the
    qualified names of the variants whose repository is not mirrored.
    """
    over = over or {}
    # rez canonicalises a filesystem repository's location (realpath) and then
    # requires the handle's location to equal it exactly, so the new location
    # must already be canonical.
    mount_root = os.path.realpath(mountpoint) if mountpoint else ""
    targets = {alias: over.get(alias) or os.path.join(mount_root, alias) for alias in repos
               if alias in over or mount_root}
    # Longest store path first, so a store nested in another maps to its own alias.
    # A context resolved on the mount itself (the only way to resolve one
    # against a published image) is mirrored already: its locations map to
    # themselves.
    stores = sorted(
        ((form, alias) for alias, store in repos.items() if alias in targets
         # (a transparent mount's store path is the mount: not resolved, `over` is)
         for form in (set() if is_url(store) else _path_forms(store, alias not in over))
         | {targets[alias]}),
        key=lambda item: len(item[0]),
        reverse=True,
    )

    def mirrored(location: str) -> str | None:
        if not os.path.isabs(location):  # relative locations belong to rez bundles
            return None
        location = os.path.normpath(location)
        for store, alias in stores:
            if _is_within(location, store):
                return os.path.normpath(os.path.join(targets[alias], os.path.relpath(location, store)))
        return None

    rebased = copy.deepcopy(doc)
    unmapped = []
    for handle in rebased["resolved_packages"]:
        variables = handle["variables"]
        location = mirrored(variables["location"]) if variables["repository_type"] == "filesystem" else None
        if location is None:
            unmapped.append(_qualified_name(variables["name"], variables.get("version")))
        else:
            variables["location"] = location

    rebased["package_paths"] = [_rebase_package_path(entry, mirrored) for entry in rebased["package_paths"]]
    # With package caching on, rez would bind {root} to a copy in its own
    # package cache when one exists, and a production install would copy every
    # variant's payload out of the mount into that cache when the context is
    # sourced, reading the whole payload through the mount.
    rebased["package_caching"] = False
    return rebased, unmapped


def write_context(doc: dict, out_path: str, mode: int = 0o644) -> None:
    """Write *doc* to *out_path* as rez does, replacing any old file atomically:
    readers see the old file or the complete new one, never a partial one.
    *mode* 0600 for a context that embeds what not everyone may read."""
    content = json.dumps(doc, indent=4, separators=(",", ": "), sort_keys=True)
    out_path = os.path.abspath(out_path)
    directory = os.path.dirname(out_path)
    try:
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(out_path)}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write context to {out_path}: {e.strerror}") from None

    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
            f.flush()
            # mkstemp creates 0600; a baked context is meant to be sourced by
            # other users too, like one rez writes under the usual umask.
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_path, out_path)
        _fsync_directory(directory)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        if isinstance(e, OSError):
            raise UserError(f"cannot write context to {out_path}: {e.strerror or e}") from None
        raise


def context_variants(doc: dict) -> list[ContextVariant]:
    """Describe each resolved variant of *doc*, with the root rez would bind.

    Uses the rez Python package, which reads each variant's package definition
    from its handle's location (as `rez-env --input` does), so that location
    must be readable.
    """
    try:
        from rez.exceptions import RezError
        from rez.packages import get_variant
    except ImportError:
        raise UserError("reading variant roots needs the rez Python package (pip install 'rez-lazyfs[rez]')") from None

    records = []
    with warnings.catch_warnings():
        # rez imports its repository plugins with the deprecated importlib
        # load_module(); where warnings are errors that import fails and rez
        # drops the plugin ("Unrecognised package repository plugin").
        warnings.simplefilter("ignore", DeprecationWarning)
        for handle in doc["resolved_packages"]:
            variables = handle["variables"]
            try:
                variant = get_variant(copy.deepcopy(handle))
                records.append(ContextVariant(
                    name=variables["name"],
                    version=variables.get("version") or "",
                    repository_type=variables["repository_type"],
                    location=variables["location"],
                    index=variables.get("index"),
                    subpath=variant.subpath,
                    root=variant.root,
                    cachable=variant.parent.is_cachable,
                ))
            except (RezError, OSError) as e:
                name = _qualified_name(variables["name"], variables.get("version"))
                raise UserError(f"cannot read the package definition of {name} from {variables['location']}: {e}") from None
    return records


def _check_context(doc: object, path: str) -> None:
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a rez context: it holds a JSON {type(doc).__name__}, not an object")
    missing = REQUIRED_KEYS - doc.keys()
    if missing:
        raise UserError(f"{path} is not a rez context: it has no {', '.join(sorted(missing))}")

    version = str(doc["serialize_version"])
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise UserError(f"{path} has an unreadable serialize_version {version!r}") from None
    if major != SUPPORTED_SERIALIZE_MAJOR:
        raise UserError(
            f"{path} has serialize_version {version}; only {SUPPORTED_SERIALIZE_MAJOR}.x (as written by rez 3) is supported")

    handles = doc["resolved_packages"]
    if not isinstance(handles, list):
        raise UserError(f"{path} is not a rez context: resolved_packages is not a list")
    for i, handle in enumerate(handles):
        if not _is_variant_handle(handle):
            raise UserError(f"{path} is not a rez context: resolved_packages[{i}] is not a variant handle")

    paths = doc["package_paths"]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UserError(f"{path} is not a rez context: package_paths is not a list of paths")


def _is_cut_short(text: str, error: json.JSONDecodeError) -> bool:
    # rez writes one JSON object, so a document that opens it and then fails
    # at its very end, inside a string that never closes, or without the
    # closing brace, stopped early rather than being something else.
    stripped = text.strip()
    return stripped.startswith("{") and (
        error.pos >= len(text.rstrip())
        or error.msg.startswith("Unterminated string")
        or not stripped.endswith("}")
    )


def _is_variant_handle(handle: object) -> bool:
    if not isinstance(handle, dict) or not isinstance(handle.get("key"), str):
        return False
    variables = handle.get("variables")
    return isinstance(variables, dict) and all(isinstance(variables.get(k), str) for k in REQUIRED_HANDLE_VARIABLES)


def _rebase_package_path(entry: str, mirrored: Callable[[str], str | None]) -> str:
    # rez reads a package path as "<repository type>@<location>", or as a
    # plain filesystem location when there is no "@".
    repo_type, sep, location = entry.partition("@")
    if not sep:
        return mirrored(entry) or entry
    if repo_type != "filesystem":
        return entry
    location = mirrored(location)
    return f"filesystem@{location}" if location else entry


def _path_forms(path: str, resolve: bool = True) -> set[str]:
    # A context records the canonical (realpath) location of the store, while
    # the configured store path may be a symlink to it, or vice versa.
    return {os.path.normpath(os.path.abspath(path))} | ({os.path.realpath(path)} if resolve else set())


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _qualified_name(name: str, version: str | None) -> str:
    return f"{name}-{version}" if version else name


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable, not just the file's contents.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
