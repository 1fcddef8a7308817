"""Inode numbers for mount paths, with the kernel's lookup counts.

An inode lives while the kernel holds a reference: every successful lookup
(and every readdirplus entry the kernel accepts) adds one, forget() removes
what the kernel says it dropped. The mount root never goes away.

A walk of a big tree leaves the kernel holding an inode for every entry it
saw, so the table is kept small: a node holds a reference to its parent's
node and its own name (the listing's own bytes object when it came from a
readdir), not a full path, and its parent keeps it in a dict of children
rather than a second table keyed by path (500k nodes: ~84 MB, where
(alias, relpath) keys took ~177 MB). A node outlives its kernel reference
while it still has children, so a path can always be rebuilt.

Two layouts. A mount of several repositories lists their aliases at its
root: a node's path is (alias, relpath), the root's (None, b""). A
transparent mount (`mount --over`) is one repository at its store's own
path: the root is that repository's root, (alias, b""), and every other
node's path starts below it. The table alone knows which; the handlers
see (alias, relpath) either way.
"""
from __future__ import annotations

import os

import pyfuse3

# A node is (alias, relpath) inside a repository; the root of a mount of
# several repositories has alias None.
NodeKey = tuple[str | None, bytes]


class _Node:
    __slots__ = ("inode", "parent", "name", "lookups", "children")

    def __init__(self, inode: int, parent: _Node | None, name: bytes, lookups: int = 0):
        self.inode = inode
        self.parent = parent
        self.name = name
        self.lookups = lookups
        self.children: dict[bytes, _Node] | None = None


class InodeTable:
    def __init__(self, root_alias: str | None = None):
        """root_alias: the repository whose root the mount root is (a
        transparent mount); None: the mount root lists repositories."""
        self.root_alias = root_alias
        self._root = _Node(pyfuse3.ROOT_INODE, None, b"", 1)
        self._nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: self._root}
        self._next = pyfuse3.ROOT_INODE + 1
        self._peak = 1

    def __len__(self):
        return len(self._nodes)

    def __contains__(self, inode: int) -> bool:
        return inode in self._nodes

    def key(self, inode: int) -> NodeKey:
        """(alias, relpath) of a known inode; KeyError if the kernel has none."""
        node = self._nodes[inode]
        names = []
        # Up to the root, or to a child of the root when that is an alias.
        while node.parent is not None and (self.root_alias is not None
                                           or node.parent.parent is not None):
            names.append(node.name)
            node = node.parent
        if self.root_alias is not None:
            return self.root_alias, b"/".join(reversed(names))
        if node.parent is None:
            return None, b""
        return os.fsdecode(node.name), b"/".join(reversed(names))

    def child_key(self, parent: NodeKey, name: bytes) -> NodeKey:
        """The key of `name` in the directory whose key is `parent`: what key()
        gives for the child's inode, without walking the table up to the root."""
        alias, relpath = parent
        if alias is None:  # the root of a mount of several repositories: an alias
            return os.fsdecode(name), b""
        return alias, relpath + b"/" + name if relpath else name

    def parent(self, inode: int) -> int:
        """The inode of the directory holding `inode` (the root's is the root)."""
        node = self._nodes[inode]
        return node.parent.inode if node.parent is not None else node.inode

    def name(self, inode: int) -> bytes:
        """The name of `inode` in its directory (a repository's is its alias)."""
        return self._nodes[inode].name

    def children(self, inode: int) -> list[bytes]:
        """The names in `inode` the kernel may hold."""
        return list(self._nodes[inode].children or ())

    def child(self, parent: int, name: bytes) -> int | None:
        """The inode of `name` in `parent` if the kernel may hold it; allocates nothing."""
        node = (self._nodes[parent].children or {}).get(name)
        return node.inode if node is not None else None

    def find(self, alias: str | None, relpath: bytes) -> int | None:
        """The inode of (alias, relpath) if the kernel may hold it; allocates nothing."""
        if self.root_alias is not None and alias != self.root_alias:
            return None
        node = self._root
        top = [os.fsencode(alias)] if alias is not None and self.root_alias is None else []
        for name in top + (relpath.split(b"/") if relpath else []):
            node = (node.children or {}).get(name)
            if node is None:
                return None
        return node.inode

    def directories(self, inode: int = pyfuse3.ROOT_INODE) -> list[int]:
        """The inodes at and below `inode` with children: the directories the
        kernel may hold entries (and listings) of."""
        found, todo = [], [self._nodes[inode]]
        while todo:
            node = todo.pop()
            if node.children:
                found.append(node.inode)
                todo.extend(node.children.values())
        return found

    def acquire(self, inode: int) -> None:
        """One more kernel reference to a known inode (lookup of "." or "..")."""
        self._nodes[inode].lookups += 1

    def acquire_child(self, parent: int, name: bytes) -> int:
        """The inode of `name` in `parent`, allocated if new, with one more kernel
        reference: taken before the caller awaits anything, so a FORGET of an
        earlier reference arriving meanwhile cannot drop it. Undo with
        forget(inode, 1) if the lookup fails or the entry is not handed over."""
        node = self._nodes[parent]
        if node.children is None:
            node.children = {}
        child = node.children.get(name)
        if child is None:
            inode = self._next
            self._next += 1
            child = node.children[name] = self._nodes[inode] = _Node(inode, node, name)
            self._peak = max(self._peak, len(self._nodes))
        child.lookups += 1
        return child.inode

    def retire(self, inode: int) -> None:
        """`inode` (and what is below it) stays the kernel's until forgotten,
        but its name gets a new inode at its next lookup."""
        node = self._nodes[inode]
        parent = node.parent
        if parent is not None and parent.children and parent.children.get(node.name) is node:
            del parent.children[node.name]
            if not parent.children:
                parent.children = None

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is None:
            return
        node.lookups -= count
        # Dropping a node may leave its parent unreferenced and childless too.
        while node.parent is not None and node.lookups <= 0 and not node.children:
            self._nodes.pop(node.inode, None)
            parent = node.parent
            if parent.children and parent.children.get(node.name) is node:  # not retired
                del parent.children[node.name]
                if not parent.children:
                    parent.children = None
            node = parent
        # A dict never gives back the table it grew to; after the kernel
        # forgot most of a big walk (memory pressure, drop_caches), copy it.
        if self._peak > 4096 and len(self._nodes) < self._peak // 4:
            self._nodes = dict(self._nodes)
            self._peak = len(self._nodes)
