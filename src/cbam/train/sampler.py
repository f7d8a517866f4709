"""A sampler that makes training resumable to the exact sample, on one process or many.

Each epoch's order is a permutation seeded by (seed, epoch). A global batch of ``B`` images is the next
``B`` indices of that permutation; with ``W`` processes, rank ``r`` takes the ``r``-th contiguous chunk of
``B / W``. One process that accumulates gradients over ``W`` micro-batches therefore sees exactly the
samples a ``W``-process run sees, which is what makes the two comparable. The sampler yields
``(epoch, index)`` pairs so the dataset can seed each sample's augmentation from them (see
``SeededSamples``): the pictures do not depend on worker count, order or an interruption.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    def __init__(
        self,
        num_samples: int,
        *,
        global_batch: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be divisible by the {world_size} processes")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip the global batches already done (resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full if (self.drop_last or rest == 0) else full + 1

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def local_indices(self) -> list[int]:
        order = self._order()
        out: list[int] = []
        for b in range(self.start_batch, self.batches_per_epoch):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            if len(batch) < self.global_batch:  # last partial batch (evaluation): split as evenly as possible
                out += batch[self.rank :: self.world_size]
            else:
                out += batch[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        return out

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.local_indices()])

    def __len__(self) -> int:
        return len(self.local_indices())


class SeededSamples(Dataset):
    """Wraps a dataset indexed by ``(epoch, index)``: each sample's random augmentation is seeded by them."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
            return self.dataset[index]
