"""The published image of a repository: one format, shared by the publisher
(mount/publish.py) and the HTTP store (cachecore/stores/http.py), so the two
can never disagree.

An image is a directory of static files that any web server or bucket serves:

    manifest            the one mutable file: signed, names the root catalog
                        (and the traces index, if any), a revision that only
                        grows, a TTL and an expiry (manifest.py); served with
                        a short cache lifetime
    objects/ab/<hash>   immutable, content-addressed: file chunks, catalogs
                        and launch traces, named by the BLAKE3 of their
                        uncompressed bytes, zstd-compressed when that helps
                        (objects.py); served cacheable for a year

Catalogs (catalog.py) are objects too: the root catalog lists the
repository root and names one catalog per family; a family catalog lists
the family directory and its version directories (the levels that change as
versions are released) and names one payload catalog per version; a payload
catalog lists every directory below its version directory, immutable. A
mount loads only the catalogs of what it touches, and a new revision shares
every unchanged catalog and object with the one before.

Launch traces (traces.py) are objects too: one per traced variant, its
files' identities those of the image, listed by a traces index the manifest
names; a mount replays a variant's trace on its first access to it. The
chunks a trace reads are also published in packs of about a MiB, in the
order the launch first read them (packs.py), so a replay is a few dozen
requests through the proxies instead of one per chunk.
"""
