"""Reproducible, resumable iteration over source and target data.

Training is iteration-based, so the samplers are infinite streams of *positions*
0, 1, 2, ...: position p reads ``perm(epoch)[p % n]`` with ``epoch = p // n`` and a
permutation seeded by ``(seed, epoch)``, and augments it with a seed derived from
``(seed, p)``. The order and the augmentations are therefore a function of the run's seed
alone: the same with 0 or 8 loader workers, and a resumed run continues at the position
it stopped at (``start``) with exactly the batches it would have seen. Under DDP, rank r
of w takes positions r, r + w, r + 2w, ...
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _mix(*ints: int) -> int:
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(1)[0])


class InfiniteSampler(Sampler):
    """Yields ``(index, augmentation_seed)`` for positions ``start + rank``, ``+ world_size``, ...

    Args:
        n: dataset length.
        seed: the stream's seed (use different seeds for source and target).
        start: first global position (resume: ``step * batch_size * world_size``).
        shuffle: a fresh seeded permutation every epoch; False reads in order.
    """

    def __init__(self, n: int, *, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.n, self.seed, self.start = n, seed, start
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self._perm_epoch, self._perm = -1, None

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[offset]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self.start + self.rank
        while True:
            yield self.index_at(p), _mix(self.seed, 0x5EED, p)
            p += self.world_size

    def __len__(self) -> int:  # DataLoader asks; the stream is unbounded
        return 2**62


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in loader workers from torch's per-worker seed (which the
    DataLoader derives from its seeded generator), for any code that uses global RNGs."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def train_loader(dataset: Dataset, *, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """An infinite, seeded, resumable training loader (see the module docstring)."""
    sampler = InfiniteSampler(len(dataset), seed=seed, start=start, rank=rank, world_size=world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=True, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None)


class _Shard(Sampler):
    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset: Dataset, *, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A finite, in-order loader; rank r reads every w-th sample (no padding, so every
    sample is counted exactly once when the confusion matrices are summed)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=_Shard(len(dataset), rank, world_size),
                      num_workers=num_workers, pin_memory=pin_memory)


class PairedBatches:
    """Source and target batches side by side: ``next(pairs) -> (source, target)``.

    Both streams are infinite and independently seeded; a resumed run rebuilds them with
    the samplers' ``start`` at its step (the step is all a checkpoint needs).
    """

    def __init__(self, source: DataLoader | None, target: DataLoader | None):
        self._src = iter(source) if source is not None else None
        self._tgt = iter(target) if target is not None else None

    def __iter__(self):
        return self

    def __next__(self):
        src = next(self._src) if self._src is not None else None
        tgt = next(self._tgt) if self._tgt is not None else None
        return src, tgt
