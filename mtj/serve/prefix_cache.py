"""Which token prefixes the continuous engine has cached, and where (SGLang's radix cache, on the host).

The keys and values live on the devices in a pool of token positions (`mtj.decode.slots.init_pool`,
sized by --prefix-cache-gb); this tree maps token ids to those positions. Each node holds a run of tokens
and the pool positions of their keys and values; a path from the root spells a cached prefix, so a
prompt reuses the longest cached prefix of its tokens, to the token, even when it ends inside a node.
When the pool is full, the least recently used leaves are evicted, never the prefix a request is using.
Lookups and insertions cost the prompt's length; nothing grows with the number of cached prompts but
the tree itself, which the pool bounds (a node holds at least one token).
"""

from __future__ import annotations

import functools
import heapq
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtj.decode import slots as slots_verbs


class Node:
    __slots__ = ("tokens", "positions", "children", "parent", "used")

    def __init__(self, tokens: np.ndarray, positions: np.ndarray, parent: Node | None, used: int):
        self.tokens, self.positions = tokens, positions  # token ids; their pool positions
        self.children: dict[int, Node] = {}  # by first token
        self.parent, self.used = parent, used


class PrefixCache:
    """A radix tree over token ids whose nodes own positions of a pool of `size` positions."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"the prefix cache needs room for at least one token, got {size}")
        self.size = size
        self.free = list(range(size - 1, -1, -1))  # a stack of free pool positions
        self.root = Node(np.zeros(0, np.int32), np.zeros(0, np.int32), None, 0)
        self.clock = itertools.count(1)
        self.looked_up = self.hits = self.evicted = 0  # tokens: asked for, found cached, dropped from the pool

    @property
    def cached(self) -> int:
        """Tokens held in the pool."""
        return self.size - len(self.free)

    def _walk(self, ids: np.ndarray) -> list[tuple[Node, int]]:
        """The path of (node, tokens of it matched) along the longest cached prefix of ids."""
        path, node, i = [], self.root, 0
        while i < len(ids) and (child := node.children.get(int(ids[i]))) is not None:
            same = child.tokens[:len(ids) - i] == ids[i:i + len(child.tokens)]
            j = len(same) if same.all() else int(np.argmin(same))
            path.append((child, j))
            i += j
            if j < len(child.tokens):
                break
            node = child
        return path

    def lookup(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """The pool positions of the longest cached prefix of ids (marked as just used)."""
        ids = np.asarray(ids, np.int32)
        path = self._walk(ids)
        now = next(self.clock)
        for node, _ in path:
            node.used = now
        found = np.concatenate([self.root.positions] + [node.positions[:j] for node, j in path])
        self.looked_up += len(ids)
        self.hits += len(found)
        return found

    def reserve(self, ids: list[int] | np.ndarray) -> tuple[int, np.ndarray]:
        """Room for caching ids: (k, positions) where the pool positions `positions` are to receive the keys
        and values of ids[k:k + len(positions)] (the part not cached yet, or as much of it as the pool holds once
        every other evictable prefix is gone). Then `insert` once they are written, or `release`."""
        ids = np.asarray(ids, np.int32)
        path = self._walk(ids)
        k = sum(j for _, j in path)
        return k, self._allocate(len(ids) - k, {node for node, _ in path})

    def insert(self, ids: list[int] | np.ndarray, k: int, positions: np.ndarray) -> None:
        """ids[:k + len(positions)] are cached: the first k were, the rest are in `positions` (from `reserve`)."""
        if not len(positions):
            return
        ids = np.asarray(ids, np.int32)
        path = self._walk(ids[:k])
        assert sum(j for _, j in path) == k, "the tree changed between reserve and insert"
        parent = self.root
        if path:
            parent, j = path[-1]
            if j < len(parent.tokens):
                self._split(parent, j)
        leaf = Node(ids[k:k + len(positions)].copy(), positions, parent, next(self.clock))
        parent.children[int(leaf.tokens[0])] = leaf

    def release(self, positions: np.ndarray) -> None:
        """Reserved positions that were not written."""
        self.free.extend(positions.tolist())

    def _split(self, node: Node, j: int) -> None:
        """Node keeps its first j tokens; a new child takes the rest and node's children."""
        tail = Node(node.tokens[j:], node.positions[j:], node, node.used)
        tail.children = node.children
        for child in tail.children.values():
            child.parent = tail
        node.tokens, node.positions, node.children = node.tokens[:j], node.positions[:j], {int(tail.tokens[0]): tail}

    def _allocate(self, n: int, keep: set[Node]) -> np.ndarray:
        """Up to n free positions, evicting least recently used leaves (not those in `keep`) for them."""
        if n > len(self.free):
            self._evict(n - len(self.free), keep)
        n = min(n, len(self.free))
        taken, self.free = self.free[len(self.free) - n:], self.free[:len(self.free) - n]
        return np.array(taken[::-1], np.int32)

    def _evict(self, n: int, keep: set[Node]) -> None:
        """Free at least n positions (or all that can be) by dropping least recently used leaves."""
        order = itertools.count()  # ties broken by age in the heap, never by comparing nodes
        heap = [(leaf.used, next(order), leaf) for leaf in self._leaves() if leaf not in keep]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[int(leaf.tokens[0])]
            self.free.extend(leaf.positions.tolist())
            freed += len(leaf.positions)
            if parent is not self.root and not parent.children and parent not in keep:
                heapq.heappush(heap, (parent.used, next(order), parent))
        self.evicted += freed

    def _leaves(self) -> list[Node]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if not node.children:
                leaves.append(node)
        return leaves


class PrefixPool:
    """The prefix cache on the devices: the pool (as many positions as `gib` GiB of each device holds: its heads
    are split over the model axis as the slots' are), the tree of what it holds, and `prefill`, which fills a
    slot's cache row from them."""

    def __init__(self, cfg: Any, mesh: Any, gib: float, buckets: list[int]):
        if not 0 < gib < float("inf"):
            raise ValueError(f"--prefix-cache-gb must be a positive number of GiB, got {gib}")
        mp = mesh.shape.get("mp", 1)
        per_device = slots_verbs.pool_bytes_per_token(cfg) / (mp if cfg.n_heads % mp == 0 else 1)
        size = int(gib * 2 ** 30 // per_device)
        if size < cfg.seq:
            raise ValueError(f"--prefix-cache-gb {gib:g} holds {size} tokens of this model, less than one context "
                             f"({cfg.seq}); give at least {cfg.seq * per_device / 2 ** 30:.3g}")
        self.cfg, self.buckets, self.tree = cfg, buckets, PrefixCache(size)
        with jax.set_mesh(mesh):
            self.pool = slots_verbs.init_pool(cfg, size)
        self._extend = jax.jit(functools.partial(slots_verbs.extend, cfg=cfg), donate_argnums=(1, 2))
        self._save = jax.jit(slots_verbs.save, donate_argnums=0)

    def warm(self, params: Any, cache: list) -> list:
        """Compile every bucket's extend and the save (writing nothing to the pool)."""
        nowhere = jnp.full(self.cfg.seq, self.tree.size, jnp.int32)
        for size in self.buckets:
            cache, self.pool = self._extend(params, cache, self.pool, jnp.zeros((1, size), jnp.int32), jnp.int32(0),
                                            jnp.int32(0), nowhere, nowhere)
        self.pool = self._save(self.pool, cache, jnp.int32(0), nowhere)
        return cache

    def prefill(self, params: Any, cache: list, slot: int, prompt: list[int], cold: Callable[[list], list]) -> list:
        """The cache with the slot's row holding `prompt`: its longest cached prefix (but its last token: a
        prefill runs at least one) from the pool, the rest computed (by `cold` when nothing is cached), and what
        was not cached saved. A bucket that would run past the context starts earlier, recomputing cached tokens."""
        n, seq = len(prompt), self.cfg.seq
        found = self.tree.lookup(prompt)[:n - 1]
        k, positions = self.tree.reserve(prompt)
        dest = np.full(seq, self.tree.size, np.int32)  # past the pool: not saved
        dest[k:k + len(positions)] = positions
        size = next(b for b in self.buckets if b >= n - len(found))
        start = min(len(found), seq - size)
        try:
            if start <= 0:
                cache = cold(cache)
                self.pool = self._save(self.pool, cache, jnp.int32(slot), jnp.asarray(dest))
            else:
                load = np.zeros(seq, np.int32)
                load[:start] = found[:start]
                cache, self.pool = self._extend(params, cache, self.pool, slots_verbs.right_padded(prompt[start:], size),
                                                jnp.int32(start), jnp.int32(slot), jnp.asarray(load), jnp.asarray(dest))
        except BaseException:
            self.tree.release(positions)  # never cached: nothing was written there
            raise
        self.tree.insert(prompt, k, positions)
        return cache
