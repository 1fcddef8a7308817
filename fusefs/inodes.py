"""Inode numbers for mount paths, with the kernel's lookup counts.

An inode lives while the kernel holds a reference: every successful lookup
(and every readdirplus entry the kernel accepts) adds one, forget() removes
what the kernel says it dropped. The mount root never goes away.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyfuse3

# A node is (alias, relpath) inside a repository; the mount root has alias None.
NodeKey = tuple[str | None, bytes]


@dataclass
class Node:
    key: NodeKey
    lookups: int = 0


class InodeTable:
    def __init__(self):
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node((None, b""), 1)}
        self._by_key: dict[NodeKey, int] = {(None, b""): pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1

    def __len__(self):
        return len(self._nodes)

    def key(self, inode: int) -> NodeKey:
        return self._nodes[inode].key

    def inode_for(self, key: NodeKey) -> int:
        """The inode of `key`, allocated with no lookup if new."""
        inode = self._by_key.get(key)
        if inode is None:
            inode = self._next
            self._next += 1
            self._nodes[inode] = Node(key)
            self._by_key[key] = inode
        return inode

    def add_lookup(self, inode: int) -> None:
        self._nodes[inode].lookups += 1

    def drop_if_unused(self, inode: int) -> None:
        node = self._nodes.get(inode)
        if node is not None and node.lookups <= 0 and inode != pyfuse3.ROOT_INODE:
            del self._nodes[inode]
            del self._by_key[node.key]

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is not None:
            node.lookups -= count
            self.drop_if_unused(inode)
