"""The data side of rez-lazyfs: stores, metadata index, block cache, fetcher.

Nothing here imports FUSE; every piece is testable on its own and receives its
collaborators (store, index, block cache, fetcher) from the caller.
"""
