"""The engine's batches: every process its share of the images, in an order a resumed run can continue."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from unsupdistill.train.faults import ignore_stop_signals


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (it has no such option), for exact resumes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class IndexedDataset(Dataset):
    """Each item of ``dataset`` with its index: ``(item, index)``; a method keys per-image state by it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[object, int]:
        return self.dataset[index], index


def build_loader(dataset: Dataset, local_batch: int, world: int, rank: int, seed: int, workers: int,
                 pin_memory: bool) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled batches of ``local_batch`` images for process ``rank`` of ``world``, last partial batch dropped;
    each batch is ``(items, indices)`` (see :class:`IndexedDataset`).

    Images are decoded in ``workers`` processes, which leave stop signals to the training process. The
    loader's own generator is seeded, so the global RNG stays the augmentation's.
    """
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        IndexedDataset(dataset), batch_size=local_batch, sampler=sampler, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler
