"""`rez-lazyfs`: thin click commands over the mount package's library functions.

Heavy imports (pyfuse3, trio, diskcache, rez) happen inside commands so that
`--help` stays fast.
"""
from __future__ import annotations

import sys

import click

from . import fstab
from .errors import UserError
from .service import service


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"rez-lazyfs: error: {e}", err=True)
            sys.exit(1)

    def parse_args(self, ctx, args):
        # mount(8) runs `rez-lazyfs SOURCE MOUNTPOINT -o OPTIONS` (mount/fstab.py).
        return super().parse_args(ctx, fstab.as_command(args, self.commands))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rez-lazyfs")
def main():
    """Lazily localised Rez package repositories, mounted read-only."""


def cache_options(f):
    """--cache and --config: every command that touches the cache takes them."""
    f = click.option("--config", type=click.Path(dir_okay=False),
                     help="TOML config file [~/.config/rez-lazyfs/config.toml].")(f)
    # A plain string, like mount points: click.Path would stat it, which hangs
    # on a cache disk that stalls (an NFS home directory).
    return click.option("--cache", "cache_dir", metavar="DIRECTORY",
                        help="Cache directory [config, else ~/.cache/rez-lazyfs].")(f)


def mount_option(f):
    """--mount: a command on a cache takes it (and the repositories and block
    size) from the mount running there (mount/running.py: settings_from_mount)."""
    return click.option("--mount", "mountpoint", metavar="MOUNTPOINT",
                        help="Use the cache, repositories and block size of the rez-lazyfs "
                             "mount running at MOUNTPOINT.")(f)


def published_options(f):
    """--public-key and --proxy: how published images given by --repo are read."""
    f = click.option("--proxy", metavar="PROXIES",
                     help='HTTP proxies for published images: "http://p1:3128|http://p2:3128;DIRECT" '
                          "(| balances within a group, ; orders fallback groups).")(f)
    return click.option("--public-key", type=click.Path(dir_okay=False),
                        help="The public key (keygen's .pub) published images given by --repo "
                             "verify with.")(f)


def repo_options(f):
    """--repo (and --mutable, --public-key, --proxy): the repositories mirrored."""
    f = published_options(f)
    f = click.option("--mutable", multiple=True, metavar="ALIAS",
                     help="Revalidate everything in this repository by size/mtime (dev packages).")(f)
    return click.option("--repo", "repos", multiple=True, metavar="ALIAS=PATH|URL",
                        help="Mirror the store directory PATH, or the image published at URL, "
                             "at MOUNTPOINT/ALIAS (repeatable).")(f)


# Mount points are plain strings, never click.Path: its check stats the path,
# which hangs on a mount whose daemon is stopped (mount/mounts.py).
@main.command()
@click.argument("mountpoint", required=False)
@click.option("--over", metavar="STORE",
              help="Mount STORE's repository transparently at STORE itself, over the store "
                   "(read beneath through a descriptor): its paths stay the same, now cached.")
@repo_options
@cache_options
@click.option("--foreground", "-f", is_flag=True, help="Serve in this process until unmounted or signalled.")
@click.option("--block-size", help="Cache block size, e.g. 128K (fixed when a cache is created).")
@click.option("--read-ahead", help="Kernel read-ahead on the mount, e.g. 1M (root only) [kernel default, 128K].")
@click.option("--prefetch", metavar="SIZE",
              help="On a file's first read, fetch its same-suffix siblings up to SIZE (0: off) [128K].")
@click.option("--metadata-ttl", type=float, help="Seconds before repository listings are revalidated.")
@click.option("--permission-ttl", type=float,
              help="With --allow-other: seconds before payload permissions are revalidated "
                   "(0: never) [300].")
@click.option("--store-timeout", type=float, help="Seconds before an unanswered store request fails with EIO.")
@click.option("--log-file", type=click.Path(), help="Daemon log [CACHE/logs/daemon.log].")
@click.option("--offline", is_flag=True, default=None, help="Never contact the store: serve the cache alone.")
@click.option("--allow-other", is_flag=True, default=None, help="Let other users (and containers) use the mount.")
@click.option("--debug", is_flag=True, default=None, help="Log every store request.")
@click.option("--open-requests", is_flag=True, default=None,
              help="Have the kernel send every open and release, as with stock pyfuse3 (slower).")
@click.option("--shared-cache", "shared_caches", multiple=True, type=click.Path(file_okay=False),
              callback=lambda ctx, param, value: list(value) or None,
              help="A read-only cache (say the host's, in a container) read before the store; "
                   "what is fetched goes to --cache (repeatable).")
def mount(mountpoint, foreground, **options):
    """Mount the configured repositories read-only at MOUNTPOINT, or one
    repository over its own store path (--over STORE)."""
    from .config import load_settings
    from .daemon import mount_fs

    mount_fs(load_settings(mountpoint, **options), foreground=foreground)


def _warn(message: str) -> None:
    click.echo(f"rez-lazyfs: warning: {message}", err=True)


@main.command()
@click.argument("context", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the baked context.")
@click.option("--mount", "mountpoint", metavar="DIRECTORY",
              help="The mount point the baked context points at [config mountpoint]; a "
                   "mount running there gives the cache and repositories.")
@repo_options
@cache_options
@click.option("--strict", is_flag=True, help="Fail if a variant is not in a mirrored repository.")
@click.option("--force", is_flag=True,
              help="Bake onto the mount variants rez would not cache too (cachable or "
                   "relocatable False, default_cachable* settings).")
@click.option("--populate", is_flag=True, help="Also fetch every payload block the context uses.")
@click.option("--trace", "trace_files", multiple=True, type=click.Path(dir_okay=False),
              help="Embed the launch traces of the context's variants from this trace file "
                   "(`trace record`; repeatable).")
def bake(context, output, mountpoint, strict, force, populate, trace_files, **options):
    """Write a deep copy of CONTEXT (.rxt) whose variants live under the mount."""
    from .context import bake_context, populate_context
    from .running import settings_from_mount
    from .trace import read_trace_file

    settings = settings_from_mount(mountpoint, fallback=True, **options)
    traces = [t for path in trace_files for t in read_trace_file(path)]
    deep = bake_context(context, output, settings, strict=strict, force=force, traces=traces,
                        warn=_warn)
    click.echo(f"baked {len(deep.variants)} variant(s) onto {deep.destination}: {output}"
               + (f" (with the traces of {len(deep.traces)})" if deep.traces else ""))
    if populate:
        _report_populate(populate_context(output, settings, warn=_warn))


def _report_populate(counts: dict) -> None:
    click.echo(f"populated {counts['files']} file(s): fetched {counts['blocks_fetched']} block(s), "
               f"{counts['bytes_fetched']} bytes; {counts['blocks_already_cached']} already cached")


def seed_options(f):
    """What seed and populate take: the cache, and where this machine's stores are."""
    f = click.option("--block-size", help="The block size of the mount that will use the cache.")(f)
    f = cache_options(f)
    f = published_options(f)
    return click.option("--repo", "repos", multiple=True, metavar="ALIAS=PATH|URL",
                        help="The store of ALIAS on this machine [the config, else what the "
                             "cache records, else what the context names].")(f)


@main.command()
@click.argument("context", type=click.Path(dir_okay=False))
@seed_options
@mount_option
def populate(context, **options):
    """Fetch every payload block of every variant of a baked CONTEXT into the cache."""
    from .context import populate_context
    from .running import settings_from_mount

    _report_populate(populate_context(context, settings_from_mount(need_repos=False, **options),
                                      warn=_warn))


@main.command()
@click.argument("context", type=click.Path(dir_okay=False))
@seed_options
@mount_option
def seed(context, **options):
    """Put the definitions (and launch traces) embedded in a baked CONTEXT into
    the cache (checked against the store when it answers; taken from the file
    alone when not). CONTEXT may also be a trace file (`trace record`)."""
    from .context import seed_context
    from .running import settings_from_mount
    from .trace import is_trace_file, seed_traces

    settings = settings_from_mount(need_repos=False, **options)
    if is_trace_file(context):
        seeded = seed_traces(context, settings)
        click.echo(f"seeded the trace(s) of {len(seeded)} variant(s) "
                   f"({sum(t['blocks'] for t in seeded)} block(s))")
        return
    listings, files, traces = seed_context(context, settings, warn=_warn)
    click.echo(f"seeded {listings} directory listing(s), {files} definition file(s)"
               + (f" and the traces of {traces} variant(s)" if traces else ""))


@main.group(cls=_Group)
def trace():
    """Launch traces: what a start-up reads, fetched ahead in parallel on the
    first access to a traced variant (a cold start)."""


@trace.command("record", context_settings={"ignore_unknown_options": True})
@click.argument("context", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The trace file to write (merged into it if it exists).")
@click.option("--mount", "mountpoint", metavar="DIRECTORY",
              help="The mount the command reads through [the context's mount point].")
@repo_options
@cache_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def trace_record(context, output, mountpoint, command, **options):
    """Run COMMAND in the baked CONTEXT and record, per variant, what it reads.

    The mount running at the context's mount point records (its owner or root
    may ask); with none running, one is mounted for the run from --repo,
    --cache and the config. COMMAND's output and exit status pass through.

        rez-lazyfs trace record shot.lazy.rxt -o maya.trace -- maya -batch -command quit
    """
    from .running import settings_from_mount
    from .trace import record

    settings = settings_from_mount(mountpoint, fallback=True, need_repos=False, **options)
    sys.exit(record(context, output, list(command), settings,
                    say=lambda m: click.echo(f"rez-lazyfs: {m}", err=True)))


@trace.command("show")
@click.argument("trace_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace_show(trace_file, as_json):
    """What a trace file holds, per variant."""
    from .trace import read_trace_file, summary

    rows = summary(read_trace_file(trace_file))
    if as_json:
        _emit_json(rows)
        return
    _table(["repo", "variant", "files", "dirs", "blocks", "size"],
           [[r["repo"], r["root"], r["files"], r["directories"], r["blocks"], _human(r["bytes"])]
            for r in rows])


@main.command()
@click.argument("context", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--mount", "mountpoint", metavar="DIRECTORY",
              help="The mount point the exported context will be mounted at [config "
                   "mountpoint]; a mount running there gives the repositories.")
@repo_options
@cache_options
def export(context, directory, mountpoint, **options):
    """A standalone CONTEXT: DIRECTORY gets it baked plus a populated cache of its variants."""
    from .context import export_context
    from .running import settings_from_mount

    settings = settings_from_mount(mountpoint, fallback=True, **options)
    counts = export_context(context, directory, settings, warn=_warn)
    _report_populate(counts)
    click.echo(f"exported to {directory}; mount it offline with:\n"
               f"  rez-lazyfs mount {settings.mountpoint} --config {directory}/rez-lazyfs.toml")


def _human(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _ago(when) -> str:
    import time

    if not when:
        return "-"
    seconds = time.time() - when
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def _table(headers: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _emit_json(data) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True))


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@main.command()
@cache_options
@mount_option
@json_option
def status(as_json, **options):
    """What the cache holds: one row per package version seen, with its variants."""
    from .admin import cache_status
    from .running import settings_from_mount

    data = cache_status(settings_from_mount(need_repos=False, **options))
    for warning in data["warnings"]:
        _warn(warning)
    if as_json:
        return _emit_json(data)
    _report_pins(data["released_pins"], data["unanswered_pins"], dry_run=False)
    click.echo(f"cache {data['cache_dir']}: {_human(data['size_bytes'])} on disk, "
               f"limit {_human(data['limit_bytes']) if data['limit_bytes'] else 'none'}")
    _table(["PACKAGE", "VERSION", "VARIANTS", "CACHED", "FILES", "LAST USED", "PINNED",
            "TRACE", "STORE", "LOCAL"],
           [[v["package"], v["version"], ",".join(v["variants"]),
             f"{_human(v['bytes_cached'])} / {_human(v['bytes_total'])}"
             + ("" if v["totals_complete"] else "+"),
             f"{v['files_cached']} / {v['files_total']}" + ("" if v["totals_complete"] else "+"),
             _ago(v["last_used"]), "yes" if v["pinned"] else "no",
             ",".join(v["traces"]) or "no", v["store_path"],
             v["local_path"] or "-"] for v in data["variants"]])
    pinned = [p for p in data["pins"] if p["from"]]  # `pin`'s; bake's show as PINNED only
    if pinned:
        click.echo("")
        _table(["PIN", "KIND", "CACHED", "FILES", "FROM"],
               [[p["pin"], p["kind"], _human(p["bytes_cached"]), p["files_cached"],
                 ", ".join(p["from"])] for p in pinned])


@main.command()
@cache_options
@mount_option
@json_option
@click.option("--prometheus", is_flag=True,
              help="The Prometheus text format (for node_exporter's textfile collector).")
@click.option("--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the Prometheus text to FILE atomically (FILE.PID.TID, then renamed "
                   "over FILE; implies --prometheus).")
def stats(as_json, prometheus, output, **options):
    """How well the cache works: hits, misses, traffic and fetch latency, per mount and in total."""
    from .admin import cache_stats
    from .running import settings_from_mount

    settings = settings_from_mount(need_repos=False, **options)
    if prometheus or output:
        return _stats_prometheus(settings, as_json, output)
    data = cache_stats(settings)
    for warning in data["warnings"]:
        _warn(warning)
    if as_json:
        return _emit_json(data)

    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    rows = [[s["name"] + (" (running)" if s["running"] else ""), s] for s in data["sources"]]
    rows.append(["total", data["total"]])
    _table(["SOURCE", "HITS", "MISSES", "HIT RATIO", "SERVED", "FETCHED", "STORE REQS",
            "P50 MS", "P95 MS", "P99 MS", "ERRORS"],
           [[name, s["cache_hits"], s["cache_misses"],
             "-" if s["hit_ratio"] is None else f"{s['hit_ratio']:.1%}",
             _human(s["bytes_served"]), _human(s["store_bytes"]),
             s["store_reads"] + s["store_listings"], ms(s["fetch_p50_ms"]),
             ms(s["fetch_p95_ms"]), ms(s["fetch_p99_ms"]), s["errors"]] for name, s in rows])
    for source in data["sources"]:
        if source["replay_blocks"] or source["replay_skipped"]:
            click.echo(f"{source['name']}: trace replays fetched {source['replay_blocks']} "
                       f"block(s) ({_human(source['replay_bytes'])}) ahead, "
                       f"{source['replay_useful']} then read, {source['replay_waste']} not "
                       f"read (yet); {source['replay_skipped']} traced file(s) skipped")
        for alias, c in source.get("stores", {}).items():
            routes = ", ".join(f"{route} {r['requests']} ({r['failures']} failed)"
                               for route, r in sorted(c.get("routes", {}).items()))
            click.echo(f"{source['name']} {alias}: {c['requests']} HTTP requests, "
                       f"{_human(c['bytes'])} on the wire, {c['failovers']} failovers; {routes}")


def _stats_prometheus(settings, as_json: bool, output: str | None) -> None:
    from prometheus_client import generate_latest

    from .metrics import stats_registry, write_textfile

    if as_json:
        raise UserError("--json is another format than --prometheus (and --output): give one")
    registry, warnings = stats_registry(settings)
    for warning in warnings:
        _warn(warning)
    if output:
        write_textfile(output, registry)
    else:
        click.echo(generate_latest(registry), nl=False)


@main.command()
@cache_options
@mount_option
@click.option("--max-size", help="Evict least recently used data until the cache is this small.")
@click.option("--max-days", type=float, help="Evict whatever was not used for this many days.")
@click.option("--dry-run", is_flag=True, help="Say what would be evicted; evict nothing.")
@json_option
def clean(max_size, max_days, dry_run, as_json, **options):
    """Keep the cache bounded. Pinned data stays; running mounts keep working."""
    from . import admin
    from .running import settings_from_mount

    report = admin.clean(settings_from_mount(need_repos=False, **options), max_size=max_size,
                         max_days=max_days, dry_run=dry_run)
    for warning in report["warnings"]:
        _warn(warning)
    if as_json:
        return _emit_json(report)
    verb = "would evict" if dry_run else "evicted"
    _report_pins(report["released_pins"], report["unanswered_pins"], dry_run)
    click.echo(f"{verb} {report['evicted_files']} file(s), {_human(report['evicted_bytes'])}; "
               f"cache {_human(report['size_before'])} -> {_human(report['size_after'])} "
               f"({_human(report['pinned_bytes'])} pinned)")
    if report["pins"]:
        click.echo(f"kept what {report['pins']} pin(s) hold (`rez-lazyfs status` lists them)")
    if "warning" in report:
        _warn(report["warning"])


def _report_pins(released: int, unanswered: int, dry_run: bool) -> None:
    from cachecore.clean import HOLDER_TIMEOUT

    if released:
        click.echo(f"{'would release' if dry_run else 'released'} {released} pin(s) of "
                   "baked contexts whose file is gone or replaced")
    if unanswered:
        _warn(f"{unanswered} baked context file(s) did not answer within {HOLDER_TIMEOUT:g}s; "
              "their pins are kept")


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="PKG-VERSION|CONTEXT|LIST...")
@click.option("--sync", is_flag=True,
              help="Make the pins from each LIST exactly its lines: what it no longer names is "
                   "unpinned (unless pinned otherwise too).")
@click.option("--populate", is_flag=True, help="Also fetch every file of what is pinned.")
@mount_option
@seed_options
@json_option
def pin(targets, sync, populate, as_json, **options):
    """Keep what TARGETS name in the cache whatever clean does: a package
    version (FAMILY-VERSION in every repository that holds it,
    ALIAS:FAMILY-VERSION in one), a baked context (its variants), or a LIST
    file of those, one a line (# comments). Pinning again changes nothing.

        rez-lazyfs pin --sync /studio/toolsets/production.txt --populate
    """
    from .pins import pin as pin_targets
    from .running import settings_from_mount

    report = pin_targets(settings_from_mount(need_repos=False, **options), list(targets),
                         sync=sync, populate=populate, warn=_warn)
    if as_json:
        return _emit_json(report)
    _report_pin_changes(report["changes"])
    if "populated" in report:
        _report_populate(report["populated"])


@main.command()
@click.argument("targets", nargs=-1, required=True, metavar="PKG-VERSION|CONTEXT|LIST...")
@mount_option
@cache_options
@json_option
def unpin(targets, as_json, **options):
    """Let clean evict what TARGETS pinned: a package version or context
    (whichever list pinned it too), or what a LIST file pinned (a pin that
    something else pinned too stays)."""
    from .pins import unpin as unpin_targets
    from .running import settings_from_mount

    report = unpin_targets(settings_from_mount(need_repos=False, **options), list(targets))
    if as_json:
        return _emit_json(report)
    _report_pin_changes(report["changes"])
    for text in report["not_pinned"]:
        click.echo(f"not pinned: {text}")


def _report_pin_changes(changes: list[dict]) -> None:
    counts = dict.fromkeys(("pinned", "updated", "unchanged", "unpinned"), 0)
    for c in changes:
        counts[c["change"]] += 1
        if c["change"] != "unchanged":
            origins = f" (from {', '.join(c['from'])})" if c["from"] else ""
            click.echo(f"{c['change']} {c['pin']}{origins}")
    click.echo(", ".join(f"{n} {change}" for change, n in counts.items()))


@main.command()
@click.argument("target")
@click.option("--mount", "mountpoint", metavar="MOUNTPOINT",
              help="Tell this running mount only (its daemon forgets in its own cache too).")
@repo_options
@cache_options
def forget(target, mountpoint, **options):
    """List TARGET from the store again: a directory (a path in a mount or a store)
    or a package version (FAMILY-VERSION), with everything below it.

    For a payload that changed after it was listed (a release listed while it
    was still being copied): drops its listings from the cache and from the
    memory of running mounts of that cache."""
    from .forget import forget as forget_target
    from .running import settings_from_mount

    # With --mount, only to refuse options that contradict it: the mount forgets.
    settings = settings_from_mount(mountpoint, need_repos=False, **options)
    for line in forget_target(settings, target, mountpoint):
        click.echo(line)


@main.command()
@cache_options
@mount_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
def logs(follow, **options):
    """The mount daemon's log (one line per fetch error, naming the file)."""
    from .admin import show_logs
    from .running import settings_from_mount

    show_logs(settings_from_mount(need_repos=False, **options), follow)


@main.command()
@click.argument("keyfile", type=click.Path())
def keygen(keyfile):
    """Make the key pair that signs published images: KEYFILE (secret) and KEYFILE.pub."""
    from .publish import keygen as make_key

    make_key(keyfile)
    click.echo(f"wrote the signing key {keyfile} (keep it secret) and the public key "
               f"{keyfile}.pub (give it to the mounts)")


@main.command()
@click.argument("repo_dir", type=click.Path())
@click.argument("dest_dir", type=click.Path())
@click.option("--key", "key_path", required=True, type=click.Path(),
              help="The signing key (rez-lazyfs keygen).")
@click.option("--ttl", type=int, help="Seconds mounts may use the manifest before asking again [61].")
@click.option("--valid-for", default="30d", show_default=True,
              help="How long the revision stays valid unless published again (e.g. 30d, 12h).")
@click.option("--trace", "trace_files", multiple=True, metavar="TRACE",
              help="Carry the launch traces of REPO_DIR's variants from this trace file "
                   "(`trace record`; repeatable); they replace those variants' traces of "
                   "the previous revision, which the other variants keep.")
@json_option
def publish(repo_dir, dest_dir, key_path, ttl, valid_for, trace_files, as_json):
    """Publish the Rez repository REPO_DIR as the next revision of the signed
    image in DEST_DIR, for a web server to serve as plain files."""
    import contextlib

    from cachecore.image.manifest import DEFAULT_TTL

    from .publish import TerminalProgress, parse_duration
    from .publish import publish as publish_image
    from .trace import read_trace_file

    # Every trace file is read before anything is written: a bad one publishes nothing.
    try:
        traces = [t for path in trace_files for t in read_trace_file(path)]
    except UserError as e:
        raise UserError(f"--trace: {e} (nothing published)") from None
    progress = TerminalProgress() if sys.stderr.isatty() else None

    def warn(message: str) -> None:
        if progress:
            progress.clear()
        _warn(message)

    with progress or contextlib.nullcontext():
        report = publish_image(repo_dir, dest_dir, key_path,
                               ttl=DEFAULT_TTL if ttl is None else ttl,
                               valid_for=parse_duration(valid_for), traces=traces,
                               progress=progress, warn=warn)
    if as_json:
        return _emit_json(report.to_json())
    click.echo(report.line(repo_dir, dest_dir))


@main.command()
@click.argument("mountpoint")
@click.option("--lazy", "-z", is_flag=True, help="Detach now even if files are open.")
def umount(mountpoint, lazy):
    """Unmount a rez-lazyfs mount."""
    from .daemon import unmount

    note = unmount(mountpoint, lazy=lazy)
    if note:
        _warn(note)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Where to build and mount [a temp dir].")
@click.option("--keep", is_flag=True, help="Keep the work directory afterwards.")
def demo(workdir, keep):
    """Build a sample repository, mount it, launch from it cold and warm, print figures."""
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(workdir) if workdir else None, keep)


@main.command()
@click.argument("mountpoint", required=False)
@click.option("--mount", "running", metavar="MP",
              help="Check the running mount at MP instead: answering, its daemon, read-ahead, "
                   "FUSE limits, its cache.")
@repo_options
@cache_options
@click.option("--store-timeout", type=float, help="Seconds a store has to answer [15].")
@click.option("--offline", is_flag=True, default=None,
              help="Check for a mount that never contacts the store.")
@click.option("--allow-other", is_flag=True, default=None,
              help="Check for a mount other users can use.")
# The file fusermount3 reads; an option so that tests can give a file of their own.
@click.option("--fuse-conf", default="/etc/fuse.conf", hidden=True)
@json_option
def doctor(mountpoint, running, fuse_conf, as_json, **options):
    """Check what breaks mounts in practice (FUSE, the cache, the stores, the
    mount point; or, with --mount, a running mount): one line per check, ok,
    warning or problem, with its fix. Exit status 1 if there is a problem."""
    from .config import load_settings
    from .system.doctor import PROBLEM, diagnose, report

    if mountpoint and running:
        raise UserError("give MOUNTPOINT or --mount MP, not both")
    checks = diagnose(lambda: load_settings(mountpoint, need_repos=False, **options),
                      running=running, fuse_conf=fuse_conf)
    if as_json:
        _emit_json(report(checks))
    else:
        for check in checks:
            click.echo(check.line())
    sys.exit(1 if any(c.level == PROBLEM for c in checks) else 0)


main.add_command(service)
main.add_command(fstab.fstab_mount)

if __name__ == "__main__":
    main()
