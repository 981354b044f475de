"""What pretraining blocks and fine-tuning conversations load alike: exact resume, the data-parallel split and
fixed evaluation sets, for ``AzGPTDataModule`` and ``InstructionDataModule``.

- Training: micro-batch ``i`` (``step * accumulate_grad_batches + micro``) is a pure function of (seed, rank, i)
  (``block_offsets``), so a resumed run draws exactly what an uninterrupted one would, with no loader state to save,
  and every data-parallel replica draws different rows.
- Evaluation: a fixed list, padded to a multiple of the number of replicas with rows whose targets are all
  ``PAD_TARGET`` (``padded_length``), sharded so that each row is evaluated by exactly one replica.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset


def block_offsets(seed: int, rank: int, micro_batch_index: int, batch_size: int, high: int) -> np.ndarray:
    """The rows of one training micro-batch, each in ``[0, high)``: block starts or example indices.

    Each (seed, rank, micro_batch_index) has its own random stream, so the result depends on nothing else.
    """
    rng = np.random.default_rng([seed, rank, micro_batch_index])
    return rng.integers(0, high, size=batch_size)


def padded_length(count: int, replicas: int) -> int:
    """``count`` rounded up to a multiple of ``replicas``: every replica gets as many evaluation rows."""
    return -(-count // replicas) * replicas


class EndlessBatches(IterableDataset):
    """Micro-batches ``start_index``, ``start_index + 1``, ... for ever; a subclass says what ``batch_at`` gives."""

    def __init__(self, batch_size: int, seed: int, rank: int = 0, start_index: int = 0) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start_index = start_index

    def rows(self, index: int, high: int) -> np.ndarray:
        """The ``batch_size`` rows (each in ``[0, high)``) of micro-batch ``index``."""
        return block_offsets(self.seed, self.rank, index, self.batch_size, high)

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch ``index`` (the same every time it is asked for)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.start_index
        while True:
            yield self.batch_at(index)
            index += 1


class IndexedDataModule(L.LightningDataModule):
    """A LightningDataModule that trains on ``EndlessBatches`` and evaluates fixed padded lists.

    A subclass sets ``seed``, ``batch_size`` and ``num_workers`` and builds its datasets; the loaders are here.
    """

    seed: int
    batch_size: int
    num_workers: int

    def _data_parallel(self) -> tuple[int, int]:
        """(number of data-parallel replicas, this process's replica index); (1, 0) without a trainer.

        The strategy's sampler arguments, not the global rank: they are the same under DDP and FSDP, and
        under model-parallel strategies processes that share one replica must read the same data.
        """
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not kwargs:
            return 1, 0
        return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))

    def _first_micro_batch(self) -> int:
        """Micro-batch index to draw first, read from the trainer after any checkpoint restore."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def _generator(self) -> torch.Generator:
        # Each DataLoader iterator draws a seed; from its own generator it leaves the global RNG (dropout) alone,
        # so validations and resumes do not shift the dropout masks of later steps.
        return torch.Generator().manual_seed(self.seed)

    def _train_loader(self, dataset: EndlessBatches) -> DataLoader:
        """``dataset``'s micro-batches as they come (each is a whole batch already)."""
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), generator=self._generator())

    def _eval_loader(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        """``dataset`` (padded to a multiple of the replicas) in order, this replica's share only."""
        replicas, rank = self._data_parallel()
        # Our own DistributedSampler over the padded list: Lightning keeps any DistributedSampler it finds,
        # whatever trainer.use_distributed_sampler says, while its default one would pad with duplicates.
        sampler = (DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
                   if replicas > 1 else None)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_fn,
                          pin_memory=torch.cuda.is_available(), generator=self._generator())

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.val_dataloader()
