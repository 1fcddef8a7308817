"""`rez-lazyfs pin` and `unpin`: what clean must keep, as a studio's toolset
management says (REP-003: "provide a set of keep-alive packages ... coming
from external sources", rather than a heuristic that lacks that knowledge).

What can be pinned:

* `FAMILY-VERSION`: every file of that package version, all its variants, in
  every repository that holds it when pinned; `ALIAS:FAMILY-VERSION`: in
  that repository only;
* a baked context: every file of its variants, and their definitions;
* a list file: one of those per line (`#` comments, blank lines; context
  paths relative to the list), for `pin LIST` and `pin --sync LIST`.

A pin is a rule, not a list of file keys: it records paths in stores, and
every clean keeps whatever the index lists at or below them when it runs
(cachecore/clean.py: PinnedFiles), so blocks fetched after pinning are kept
too. Each pin records where it came from: the command line, or the real
paths of the list files that name it. `pin --sync LIST` makes the pins from
LIST equal its lines, so running the same list twice changes nothing and a
line dropped unpins its pin, unless it was pinned otherwise as well (from the
command line or another list). A context's pin ends with its file (SECURITY.md
rule 16), as bake's own pin of its definitions does (`context:PATH`: bake,
seed and populate make it, and it is not this module's to unpin).

Everything given is checked (names, files, lists, contexts, which
repositories hold each package version) before any pin is written.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from .config import Settings
from .errors import UserError

COMMAND_LINE = "command line"  # the origin of a pin given as an argument; a list's is its path
PACKAGE_PIN = "package:"       # ledger names: package:[ALIAS:]FAMILY-VERSION,
CONTEXT_PIN = "variants:"      # and variants:REALPATH (bake's are context:REALPATH)
_COMMENT = re.compile(r"(^|\s)#.*")


@dataclass(frozen=True)
class PackageVersion:
    alias: str  # "" for every repository that holds it
    family: str
    version: str

    @property
    def shown(self) -> str:
        return (f"{self.alias}:" if self.alias else "") + f"{self.family}-{self.version}"

    @property
    def name(self) -> str:
        return PACKAGE_PIN + self.shown

    @property
    def relpath(self) -> str:
        return f"{self.family}/{self.version}"


@dataclass(frozen=True)
class Context:
    path: str  # real path

    @property
    def shown(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        return CONTEXT_PIN + self.path


def parse_package_version(text: str) -> PackageVersion:
    """'maya-2024.2' or 'main:maya-2024.2', checked as rez checks names and
    versions, and as a path in a store (cachecore/paths.py)."""
    from rez.utils.formatting import is_valid_package_name
    from rez.version import Version, VersionError

    from cachecore.paths import BadPath, relpath_from_text

    alias, _, rest = text.rpartition(":")
    family, _, version = rest.partition("-")
    why = ""
    if ":" in alias or (":" in text and not alias):
        why = "an alias is a plain name"
    elif not version:
        why = "no version"
    elif not is_valid_package_name(family):
        why = f"{family!r} is not a rez package name"
    else:
        try:
            if str(Version(version)) != version:
                why = f"rez reads the version {version!r} as {str(Version(version))!r}"
            relpath_from_text(f"{alias or family}/{family}/{version}")
        except VersionError as e:
            why = f"not a rez version: {e}"
        except BadPath as e:
            why = str(e)
    if why:
        raise UserError(f"{text!r} is not FAMILY-VERSION or ALIAS:FAMILY-VERSION ({why})")
    return PackageVersion(alias, family, version)


def _names_a_file(text: str, base: str) -> bool:
    return "/" in text or text.endswith(".rxt") or os.path.isfile(os.path.join(base, text))


def _is_context_file(path: str) -> bool:
    """A rez context is a JSON object; a list file is lines of names and paths."""
    if path.endswith(".rxt"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip().startswith(b"{")
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def read_list(path: str) -> list[PackageVersion | Context]:
    """The entries of a list file; a bad line is an error naming it."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"no such list file: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a list file") from None
    except OSError as e:
        raise UserError(f"cannot read the list file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"the list file {path} is not UTF-8 text") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = _COMMENT.sub("", line).strip()
        if not entry:
            continue
        try:
            if not _names_a_file(entry, os.path.dirname(path)):
                entries.append(parse_package_version(entry))
                continue
            listed = os.path.join(os.path.dirname(path), entry)
            if not _is_context_file(listed):
                raise UserError(f"{listed} is a list file: lists do not name lists")
            entries.append(Context(os.path.realpath(listed)))
        except UserError as e:
            raise UserError(f"{path}, line {number}: {e}") from None
    return entries


def _origins(targets: list[str], sync: bool) -> dict[str, list[PackageVersion | Context]]:
    """origin (COMMAND_LINE or a list's real path) -> what it pins."""
    origins: dict[str, list] = {}
    for text in targets:
        if not _names_a_file(text, os.getcwd()):
            try:
                package = parse_package_version(text)
            except UserError as e:
                raise UserError(f"{e}, nor a file") from None
            if sync:
                raise UserError(f"--sync takes list files; {text} is a package version")
            origins.setdefault(COMMAND_LINE, []).append(package)
        elif _is_context_file(text):
            if sync:
                raise UserError(f"--sync takes list files; {text} is a context")
            origins.setdefault(COMMAND_LINE, []).append(Context(os.path.realpath(text)))
        else:
            path = os.path.realpath(text)
            origins[path] = read_list(path)
    return origins


# -- pinning ------------------------------------------------------------------
def pin(settings: Settings, targets: list[str], *, sync: bool = False, populate: bool = False,
        progress: bool | None = None, warn=lambda message: None) -> dict:
    """Pin what *targets* name (module docstring); with *sync*, also unpin
    what each list file pinned and no longer names. Returns
    {"changes": [{"pin", "kind", "change", "from"}], "populated": counts (with *populate*)}."""
    import trio

    from .context import load_baked
    from .daemon import open_cache

    origins = _origins(targets, sync)
    wanted = [t for entries in origins.values() for t in entries]
    contexts = {t.path: load_baked(t.path) for t in wanted if isinstance(t, Context)}
    cache = open_cache(settings)
    try:
        resolved, trees = trio.run(_resolve, cache, settings, wanted, contexts, warn)
        changes = _apply(cache.index, {origin: {t.name for t in entries}
                                       for origin, entries in origins.items()},
                         resolved, sync)
        report: dict = {"changes": changes}
        if populate:
            from .context import populate_trees, seed_for_populating

            specs, roots = trees
            for deep, holder in contexts.values():
                context_specs, context_roots = seed_for_populating(cache, deep, holder,
                                                                   settings, warn)
                specs.update((s.alias, s) for s in context_specs if s.alias not in specs)
                roots |= context_roots
            show = sys.stderr.isatty() if progress is None else progress
            report["populated"] = populate_trees(cache, list(specs.values()), roots, settings,
                                                 show=show, what="what is pinned")
        return report
    finally:
        cache.close()


async def _resolve(cache, settings: Settings, wanted: list, contexts: dict, warn):
    """name -> the record of each pin wanted (without "from"), and the
    repositories and (alias, path) trees of the package versions, for --populate."""
    from cachecore.errors import LazyFSError, NotADirectory, NotFound
    from cachecore.index import pin_record
    from cachecore.stores import store_id

    from .context import store_paths
    from .daemon import repo_specs

    resolved: dict[str, dict] = {}
    packages = [t for t in wanted if isinstance(t, PackageVersion)]
    specs = {s.alias: s for s in repo_specs(settings, cache)} if packages else {}
    repos = cache.repositories(list(specs.values()), metadata_ttl=settings.metadata_ttl,
                               store_timeout=settings.store_timeout,
                               store_threads=settings.store_threads)
    roots = set()
    for p in packages:
        if p.alias and p.alias not in repos:
            raise UserError(f"{p.shown}: no repository {p.alias!r} (there are "
                            f"{', '.join(sorted(repos))})")
        holders, unasked = [], []
        for alias in [p.alias] if p.alias else sorted(repos):
            try:
                await _list_down_to(repos[alias], os.fsencode(p.relpath))
                holders.append(alias)
            except (NotFound, NotADirectory):
                pass
            except LazyFSError as e:
                unasked.append(f"{alias} ({e})")
        if not holders:
            raise UserError(f"no repository holds {p.shown}"
                            + (f"; could not ask {', '.join(unasked)}" if unasked else ""))
        roots.update((alias, os.fsencode(p.relpath)) for alias in holders)
        resolved[p.name] = pin_record([], paths=[[repos[a].store.root, p.relpath] for a in holders],
                                      pin=p.shown, kind="package")
    for path, (deep, holder) in contexts.items():
        here = {alias: store_id(location)
                for alias, location in store_paths(deep, settings, cache, warn).items()}
        paths = ({(here[v["repo"]], v["root"]) for v in deep.variants}
                 | {(here[alias], os.fsdecode(rel)) for alias, rel in deep.files})
        resolved[CONTEXT_PIN + path] = pin_record(
            [], holder, paths=[list(p) for p in sorted(paths)], pin=path, kind="context")
    return resolved, (specs, roots)


async def _list_down_to(repo, relpath: bytes) -> None:
    """List the directories from the repository root down to *relpath*
    (NotFound if it is not there): what a mount looks up to reach it, so it
    is found offline, and status shows its size."""
    await repo.root_attr()
    parts = relpath.split(b"/")
    for depth in range(len(parts) + 1):
        await repo.listing(b"/".join(parts[:depth]))


def _apply(index, wanted: dict[str, set[str]], resolved: dict[str, dict], sync: bool) -> list[dict]:
    """Write the pins *wanted* (origin -> pin names) and, with *sync*, drop
    each list origin from the pins it no longer names (a pin with no origin
    left is unpinned). Returns what became of each pin concerned."""
    changes: list[dict] = []

    def change(records: dict[str, dict]) -> dict:
        made = {name: r for name, r in records.items() if "from" in r}  # bake's have none
        origins = {name: set(r["from"]) for name, r in made.items()}
        for origin, names in wanted.items():
            if sync:
                for held in origins.values():
                    held.discard(origin)
            for name in names:
                origins.setdefault(name, set()).add(origin)
        written = {}
        for name, now in origins.items():
            old = made.get(name)
            if name in resolved:
                new = {**resolved[name], "from": sorted(now)}
            else:
                new = {**old, "from": sorted(now)} if now else None
            if new != old:
                written[name] = new
            if new != old or name in resolved:
                changes.append(_change(old, new))
        return written

    index.change_pins(change)
    return sorted(changes, key=lambda c: (c["change"] == "unchanged", c["pin"]))


def _change(old: dict | None, new: dict | None) -> dict:
    record = new or old
    change = ("pinned" if old is None else "unpinned" if new is None
              else "unchanged" if new == old else "updated")
    return {"pin": record["pin"], "kind": record["kind"], "change": change,
            "from": record["from"] if new else []}


# -- unpinning ----------------------------------------------------------------
def unpin(settings: Settings, targets: list[str]) -> dict:
    """Unpin package versions and contexts given by name or path, whatever
    their origins, and drop list files (by path: the list may be gone) from
    the origins of the pins they made. Returns {"changes": [...], "not_pinned": [...]}."""
    from .daemon import open_cache

    names, lists = {}, set()
    for text in targets:
        if _names_a_file(text, os.getcwd()):
            path = os.path.realpath(text)
            names[CONTEXT_PIN + path] = text
            lists.add(path)
        else:
            names[parse_package_version(text).name] = text
    if not os.path.isdir(os.path.join(settings.cache_dir, "index")):
        raise UserError(f"no rez-lazyfs cache at {settings.cache_dir}")
    changes: list[dict] = []
    matched: set[str] = set()

    def change(records: dict[str, dict]) -> dict:
        written = {}
        for name, r in records.items():
            if "from" not in r:
                continue
            listed = lists & set(r["from"])
            if name in names or listed:
                matched.update(({names[name]} if name in names else set())
                               | {names[CONTEXT_PIN + path] for path in listed})
                left = sorted(set(r["from"]) - lists) if name not in names else []
                written[name] = {**r, "from": left} if left else None
                changes.append(_change(r, written[name]))
        return written

    cache = open_cache(settings)
    try:
        cache.index.change_pins(change)
    finally:
        cache.close()
    return {"changes": sorted(changes, key=lambda c: c["pin"]),
            "not_pinned": [text for text in targets if text not in matched]}


# -- what status shows --------------------------------------------------------
def pins_held(index, pinned, files: dict, payload_bytes) -> list[dict]:
    """Every pin held (clean.PinnedFiles *pinned*), with what it keeps of
    *files* (clean.scan_cache); payload_bytes(f): the store's bytes cached in f."""
    kept: dict[str, list[int]] = {name: [0, 0] for name in pinned.names}
    for f in files.values():
        for name in pinned.pins_of(f):
            kept[name][0] += 1
            kept[name][1] += payload_bytes(f)
    out = []
    for name, record in sorted(index.pin_records().items()):
        if name not in kept:
            continue
        holder = record.get("holder", {}).get("path")
        out.append({"pin": record.get("pin", holder or name),
                    "kind": record.get("kind", "definitions"),  # bake's, seed's, populate's
                    "from": record.get("from", []),
                    "paths": [os.path.join(store, path) for store, path in record.get("paths", ())],
                    "files_cached": kept[name][0], "bytes_cached": kept[name][1]})
    return out
