"""Shared building blocks for the rez-lazyfs tests.

* ``trees``    -- store trees: the "tricky tree" and hand-made Rez packages.
* ``walk``     -- a byte-exact walk of a tree (store or mount) and comparisons.
* ``witness``  -- an inotify-based counter of reads of a store file, a witness
                  that does not depend on the daemon's own stats.
* ``mounts``   -- mounting/unmounting through the real ``rez-lazyfs`` CLI.
* ``native``   -- a C program + shared libraries built with gcc.
"""
