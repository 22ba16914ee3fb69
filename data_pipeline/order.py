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


MIXTURE_PERIOD = 10_000  # positions per interleaving period: weights are kept to 1e-4


def interleave(weights: list[float], period: int = MIXTURE_PERIOD) -> np.ndarray:
    """One period of a deterministic interleaving: which source each position draws from. Smooth
    weighted round-robin over integer quotas (largest remainders of ``weights * period``), so every
    prefix of the stream holds each source's share to within one sample."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights must be finite and > 0, got {list(weights)}")
    exact = w / w.sum() * period
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[: period - int(quota.sum())]] += 1
    out = np.empty(period, dtype=np.int64)
    current = np.zeros(len(w), dtype=np.int64)
    for p in range(period):
        current += quota
        s = int(np.argmax(current))  # first maximum: ties go to the earlier source
        current[s] -= period
        out[p] = s
    return out


class MixtureOrder:
    """The global order of several sources mixed by weight. Position ``p`` draws from the source
    the interleaving gives it; the ``k``-th draw from a source is position ``k`` of that source's
    own :class:`GlobalOrder` (which repeats over its own epochs: a heavy small source is seen more
    often). Still a pure function of (seed, position): the same samples per step for any layout,
    and the consumed-samples counter is the whole state."""

    def __init__(self, sources: list[list[int]], weights: list[float], seed: int, window: int = 4,
                 shuffle: bool = True) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("MixtureOrder needs one weight per source")
        # each source its own seed stream, so adding a source does not reorder the others
        self.orders = [GlobalOrder(sizes, seed + 1_000_003 * i, window, shuffle) for i, sizes in enumerate(sources)]
        self.offsets = np.cumsum([0] + [len(s) for s in sources])[:-1].tolist()  # first shard of each source
        self.pattern = interleave(weights)
        counts = np.zeros((len(sources), len(self.pattern) + 1), dtype=np.int64)
        for s in range(len(sources)):
            counts[s, 1:] = np.cumsum(self.pattern == s)
        self._before = counts  # draws of each source before each position of a period
        self.seed = seed
        self.epoch_size = int(sum(o.epoch_size for o in self.orders))

    def _drawn(self, source: int, n: int) -> int:
        """Draws from ``source`` among the first ``n`` positions."""
        period, offset = divmod(int(n), len(self.pattern))
        return int(period * self._before[source, -1] + self._before[source, offset])

    def source_counts(self, n: int) -> list[int]:
        """Samples each source contributes to the first ``n`` positions."""
        return [self._drawn(s, n) for s in range(len(self.orders))]

    def lookup(self, position: int) -> tuple[int, int, int]:
        """Global position -> (epoch of its source, shard in the concatenated list, index in shard)."""
        s = int(self.pattern[int(position) % len(self.pattern)])
        epoch, shard, index = self.orders[s].lookup(self._drawn(s, position))
        return epoch, self.offsets[s] + shard, index
