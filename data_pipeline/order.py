"""The global sample order: one infinite stream of positions shared by every rank.

Position ``p`` (a global consumed-samples counter) maps to epoch ``p // N`` and to
a sample through a seeded permutation of that epoch: shard order is shuffled,
then samples are shuffled within windows of ``window`` consecutive shards, so
reads stay mostly sequential while the order is still well mixed.

Because the order is a pure function of (seed, position), the global batch of
step k is the same whatever the number of ranks or workers, and a resumed run
only needs the counter to continue exactly where it stopped.
"""

from __future__ import annotations

import numpy as np


class GlobalOrder:
    def __init__(self, shard_sizes: list[int], seed: int, window: int = 4, shuffle: bool = True) -> None:
        if not shard_sizes or sum(shard_sizes) == 0:
            raise ValueError("GlobalOrder needs at least one non-empty shard")
        self.shard_sizes = list(shard_sizes)
        self.seed = seed
        self.window = max(1, window)
        self.shuffle = shuffle
        self.epoch_size = int(sum(shard_sizes))
        self._cache: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        """(N, 2) int64 array of (shard, index-in-shard) for one epoch."""
        order = self._cache.get(epoch)
        if order is not None:
            return order
        sizes = self.shard_sizes
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            shard_order = rng.permutation(len(sizes))
        else:
            rng = None
            shard_order = np.arange(len(sizes))
        chunks = []
        for start in range(0, len(shard_order), self.window):
            ids = [
                np.stack([np.full(sizes[s], s, dtype=np.int64), np.arange(sizes[s], dtype=np.int64)], axis=1)
                for s in shard_order[start : start + self.window]
            ]
            block = np.concatenate(ids, axis=0)
            if rng is not None:
                block = block[rng.permutation(len(block))]
            chunks.append(block)
        order = np.concatenate(chunks, axis=0)
        if len(self._cache) >= 2:  # a batch spans at most two epochs
            self._cache.pop(min(self._cache))
        self._cache[epoch] = order
        return order

    def lookup(self, position: int) -> tuple[int, int, int]:
        """Global position -> (epoch, shard, index in shard)."""
        epoch, offset = divmod(int(position), self.epoch_size)
        shard, index = self._epoch(epoch)[offset]
        return epoch, int(shard), int(index)
