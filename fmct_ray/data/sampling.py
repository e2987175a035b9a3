"""Which scan is sample `i` of a run, which samples a worker streams, and where a resumed run
starts: pure numpy over ids (no Ray, no volumes), shared by the driver, the readers and the
training loop (`fmct_ray.data.source` reads and cuts the volumes).

- `epoch_order(seed, epoch)`: the (site, manifest row) pairs of one epoch, a fresh permutation
  every epoch with per-site sampling weights; `Plan` holds the run's ids and locates samples;
- `Shard`: the samples one training worker streams from a resume position (start + skip);
- `fold_consumed`: the resume position after training on some samples; `skip_runs` stores it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmct_ray.sites import SiteSpec


# -- the order of one epoch ----------------------------------------------------------------
def site_counts(sizes: list[int], weights: list[float], n: int) -> np.ndarray:
    """Samples per site in an epoch of `n`: proportional to weight x size, largest remainder."""
    mass = np.asarray(weights, float) * np.asarray(sizes, float)
    if mass.sum() <= 0:
        raise ValueError("no scans to sample: every site is empty or has weight 0")
    exact = n * mass / mass.sum()
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def epoch_order(sizes: list[int], weights: list[float], n: int, seed: int, epoch: int) -> np.ndarray:
    """(n, 2) int64 of (site, manifest row) for `epoch`: a function of (seed, epoch) only.

    Each site contributes `site_counts` draws: cycles of fresh permutations of its rows (without
    replacement within a cycle), then all draws are interleaved by one global permutation.
    """
    parts = []
    for s, count in enumerate(site_counts(sizes, weights, n)):
        rng = np.random.default_rng([seed, epoch, s])
        cycles = -(-count // sizes[s]) if count else 0
        rows = np.concatenate([rng.permutation(sizes[s]) for _ in range(cycles)] or [np.empty(0, np.int64)])
        parts.append(np.stack([np.full(count, s), rows[:count]], axis=1))
    order = np.concatenate(parts).astype(np.int64)
    return order[np.random.default_rng([seed, epoch]).permutation(n)]


@dataclass(frozen=True)
class Plan:
    """What the readers need: each site's scan ids of the split, the weights and the epoch length."""

    sites: tuple[SiteSpec, ...]
    scan_ids: tuple[tuple[str, ...], ...]
    samples_per_epoch: int
    seed: int

    @property
    def sizes(self) -> list[int]:
        return [len(ids) for ids in self.scan_ids]

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(
            self.sizes, [s.weight for s in self.sites], self.samples_per_epoch, self.seed, epoch
        )

    def locate(self, index: np.ndarray) -> np.ndarray:
        """(len(index), 2) (site, row) of global sample indices."""
        index = np.asarray(index, np.int64)
        out = np.empty((len(index), 2), np.int64)
        epochs = index // self.samples_per_epoch
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._cached_order(int(e))[index[sel] % self.samples_per_epoch]
        return out

    @functools.lru_cache(maxsize=2)  # noqa: B019 - plans live as long as the reader that owns them
    def _cached_order(self, epoch: int) -> np.ndarray:
        return self.order(epoch)


# -- a worker's shard and the resume position -----------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Which samples of the run one training worker streams, from sample `start` on.

    Args:
        start: first sample of the stream (the resume position).
        rank: this worker's rank.
        world: number of training workers.
        per_rank: samples per rank per optimiser step (batch x accumulation).
        skip: samples after `start` already trained on (sorted; `fold_consumed`), left out.
    """

    start: int = 0
    rank: int = 0
    world: int = 1
    per_rank: int = 1
    skip: tuple[int, ...] = ()

    def global_index(self, j: np.ndarray) -> np.ndarray:
        """Run sample index of the shard's `j`-th row."""
        step, offset = np.divmod(np.asarray(j, np.int64), self.per_rank)
        position = step * self.per_rank * self.world + self.rank * self.per_rank + offset
        # the position-th sample from `start` on that is not in `skip` (skip[i] has
        # skip[i] - start - i such samples before it)
        before = np.asarray(self.skip, np.int64) - self.start - np.arange(len(self.skip))
        return self.start + position + np.searchsorted(before, position, side="right")

    def rows(self, total_samples: int) -> int:
        """Rows of the shard: whole steps of the run's remaining samples, so every rank has as many."""
        remaining = max(0, total_samples - self.start - len(self.skip))
        return remaining // (self.per_rank * self.world) * self.per_rank


def fold_consumed(start: int, skip: tuple[int, ...], consumed) -> tuple[int, tuple[int, ...]]:
    """The resume position after training on the run indices `consumed` (all ranks) from (start, skip).

    Returns the new (start, skip): every sample below `start` and every one in `skip` has been
    trained on. Raises if a sample was trained on twice.
    """
    seen = np.concatenate([np.asarray(skip, np.int64), np.asarray(consumed, np.int64).ravel()])
    done = np.unique(seen)
    if len(done) != len(seen) or (len(done) and done[0] < start):
        raise RuntimeError(f"a sample was trained on twice (resume position {start}, {len(skip)} skipped)")
    prefix = int(np.sum(done == start + np.arange(len(done))))  # consecutive from `start`
    return start + prefix, tuple(int(i) for i in done[prefix:])


def skip_runs(skip: Sequence[int]) -> list[list[int]]:
    """Sorted samples `skip` as `[first, count]` runs of consecutive ones: how a checkpoint stores
    them. Ray Data hands each reader long runs of consecutive rows, so what was trained on ahead
    of the first gap comes in a few long runs (a few dozen bytes, not one number per sample)."""
    s = np.asarray(skip, np.int64)
    if not len(s):
        return []
    cuts = np.flatnonzero(np.diff(s) != 1) + 1
    firsts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(s)]])
    return [[int(s[a]), int(b - a)] for a, b in zip(firsts, ends, strict=True)]


def skip_from_runs(runs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    return tuple(i for first, count in runs for i in range(int(first), int(first) + int(count)))
