"""AzGPTDataModule: memory-mapped token blocks for training and validation.

Training blocks are a pure function of (seed, step, micro-batch, row, rank) and validation uses a fixed list of
non-overlapping blocks, each evaluated by exactly one process (``azgpt.data.loading`` says how).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from azgpt.errors import AzGPTError
from azgpt.data.loading import EndlessBatches, IndexedDataModule, padded_length
from azgpt.data.prepare import (OUTPUT_FILES, PrepareConfig, prepare, prepared_from_other_data, read_meta,
                                token_dtype)
from azgpt.data.tokenizer import check_vocab_size, load_tokenizer, other_tokenizer
from azgpt.targets import PAD_TARGET

_WAIT_FOR_PREPARE_SECONDS = 3600


class RandomTrainBlocks(EndlessBatches):
    """Endless micro-batches of random ``block_size + 1`` windows, starting at a given micro-batch index."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 start_index: int = 0) -> None:
        super().__init__(batch_size, seed, rank, start_index)
        self.tokens = tokens
        self.block_size = block_size

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self.rows(index, len(self.tokens) - self.block_size)
        window = np.stack([self.tokens[o : o + self.block_size + 1] for o in offsets]).astype(np.int64)
        window = torch.from_numpy(window)
        return window[:, :-1], window[:, 1:]


class FixedValBlocks(Dataset):
    """Non-overlapping ``block_size + 1`` windows from the start of val.npy, the same every time.

    ``num_replicas`` > 1 pads the list up to a multiple of it with blocks whose targets are all
    ``PAD_TARGET``, so a ``DistributedSampler`` can shard it with no duplicate (counted twice) and
    every process gets the same number of batches, even with fewer blocks than processes.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None,
                 num_replicas: int = 1) -> None:
        self.tokens = tokens
        self.block_size = block_size
        available = (len(tokens) - 1) // block_size
        self.num_blocks = available if max_blocks is None else min(available, max_blocks)
        self.padded_length = padded_length(self.num_blocks, num_replicas)

    def __len__(self) -> int:
        return self.padded_length

    def start(self, index: int) -> int:
        """Token offset of block ``index`` (< ``num_blocks``)."""
        return index * self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.padded_length:
            raise IndexError(f"validation block {index} out of range 0..{self.padded_length - 1}")
        start = self.start(index if index < self.num_blocks else 0)
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        inputs, targets = window[:-1], window[1:]
        if index >= self.num_blocks:
            targets = torch.full_like(targets, PAD_TARGET)
        return inputs, targets


_ID_CHECK_CHUNK = 1 << 24  # tokens per slice: bounded memory whatever the file size


def _check_id_range(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse token ids at or above ``vocab_size`` (an embedding lookup would fail mid-run, or read garbage)."""
    for start in range(0, len(tokens), _ID_CHECK_CHUNK):
        chunk = tokens[start : start + _ID_CHECK_CHUNK]
        top = int(chunk.max()) if len(chunk) else 0
        if top >= vocab_size:
            where = start + int(np.argmax(chunk >= vocab_size))
            raise AzGPTError(f"{path} holds token id {int(tokens[where])} at position {where:,}, outside the "
                             f"vocabulary of {vocab_size} in meta.json: the file was not written by azgpt prepare "
                             f"with this tokenizer; prepare the folder again")


class FixedTrainBlocks(FixedValBlocks):
    """``num_blocks`` windows spread evenly over train.npy, the same every time: the training data as the model
    is evaluated on it (eval mode, no dropout), comparable with the validation blocks."""

    def __init__(self, tokens: np.ndarray, block_size: int, num_blocks: int, num_replicas: int = 1) -> None:
        super().__init__(tokens, block_size, num_blocks, num_replicas)
        last_start = len(tokens) - 1 - block_size
        self._spacing = last_start / max(1, self.num_blocks - 1)

    def start(self, index: int) -> int:
        return int(index * self._spacing)


class AzGPTDataModule(IndexedDataModule):
    """Token files in ``data_dir``, built from ``corpus`` by ``prepare_data`` when they are missing.

    Args:
        data_dir: folder with train.npy, val.npy, tokenizer.json, meta.json (written by ``azgpt prepare``).
        corpus: text to prepare from when ``data_dir`` is empty: paths, named corpora (``azgpt corpora``) or
            ``hf:`` datasets; None means the sample corpus shipped with azgpt.
        vocab_size: tokenizer vocabulary; the model's vocabulary is linked to it.
        block_size: context length; the model's block size is linked to it.
        batch_size: rows per micro-batch (per device).
        seed: seed of the training block draws and of the train/val split.
        val_fraction: share of documents held out when preparing.
        val_max_blocks: cap on the number of validation blocks (None: all of val.npy).
        tokenizer: reuse this tokenizer.json when preparing instead of training one.
        num_workers: DataLoader worker processes (0 is fastest for memory-mapped slices).
        max_bytes: when preparing, read only the first SIZE of the corpus (e.g. 600MB).
        val_corpus: when preparing, take validation from this corpus (e.g. fineweb2-az?split=test) instead
            of holding out val_fraction.
    """

    def __init__(
        self,
        data_dir: str = "data/sample",
        corpus: list[str] | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 12,
        seed: int = 1337,
        val_fraction: float = 0.05,
        val_max_blocks: int | None = 200,
        tokenizer: str | None = None,
        num_workers: int = 0,
        max_bytes: str | None = None,
        val_corpus: list[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AzGPTError(f"data.{name} must be a positive integer, got {value!r}")
        if val_max_blocks is not None and val_max_blocks < 1:
            raise AzGPTError(f"data.val_max_blocks must be a positive integer or null, got {val_max_blocks!r}")
        check_vocab_size(vocab_size)
        self.data_dir = Path(data_dir)
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.val_max_blocks = val_max_blocks
        self.tokenizer_path = tokenizer
        self.num_workers = num_workers
        self.max_bytes = max_bytes
        self.val_corpus = val_corpus
        self.tokenizer_json: str | None = None
        self.meta: dict | None = None
        self._train: np.ndarray | None = None
        self._val: np.ndarray | None = None

    # -- preparation -----------------------------------------------------------------------------------

    def is_prepared(self) -> bool:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise AzGPTError(f"data.data_dir {self.data_dir} is a file, not a folder: point data.data_dir at the "
                             f"folder azgpt prepare wrote (or at a new folder to prepare into)")
        return (self.data_dir / "meta.json").is_file()

    def prepare_data(self) -> None:
        """Write the token files when ``data_dir`` lacks them (Lightning runs this on one process per node)."""
        if self.is_prepared():
            return
        leftovers = [n for n in OUTPUT_FILES if (self.data_dir / n).exists()]
        if leftovers:
            raise AzGPTError(f"{self.data_dir} holds {', '.join(leftovers)} but no meta.json (an interrupted or "
                             f"foreign preparation): delete the folder or run azgpt prepare --overwrite")
        summary = prepare(PrepareConfig(
            out=self.data_dir, corpus=self.corpus, vocab_size=self.vocab_size, val_fraction=self.val_fraction,
            seed=self.seed, tokenizer=Path(self.tokenizer_path) if self.tokenizer_path else None,
            block_size=self.block_size, max_bytes=self.max_bytes, val_corpus=self.val_corpus,
        ))
        rank_zero_info(summary.table())

    def _wait_until_prepared(self) -> None:
        """Processes that did not prepare wait for the one that did (torchrun starts them all at once)."""
        deadline = time.monotonic() + _WAIT_FOR_PREPARE_SECONDS
        while not self.is_prepared():
            if time.monotonic() > deadline:
                raise AzGPTError(f"gave up waiting for {self.data_dir}/meta.json: run azgpt prepare first")
            time.sleep(1.0)

    # -- loading and checks ----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.meta is not None:
            return
        if not self.is_prepared() and int(os.environ.get("LOCAL_RANK", "0")) != 0:
            self._wait_until_prepared()
        if not self.is_prepared():
            raise AzGPTError(f"{self.data_dir} has no meta.json: run azgpt prepare --out {self.data_dir}, "
                             f"or call prepare_data() first")
        meta = read_meta(self.data_dir)
        difference = prepared_from_other_data(self.data_dir, meta, self.corpus, self.val_corpus, self.max_bytes)
        if difference:
            raise AzGPTError(difference)
        tokenizer = load_tokenizer(self.data_dir / meta.get("tokenizer_file", "tokenizer.json"))
        self._check_consistency(meta, tokenizer)
        self._train = self._open_tokens("train.npy")
        self._val = self._open_tokens("val.npy")
        self._check_token_files(meta)
        self.tokenizer_json = tokenizer.to_str()
        self.meta = meta

    def _check_consistency(self, meta: dict, tokenizer) -> None:
        where = self.data_dir / "meta.json"
        other = other_tokenizer(meta.get("tokenizer_sha256"), tokenizer)
        if other:
            raise AzGPTError(f"{where} was written for another tokenizer than {self.data_dir}/tokenizer.json "
                             f"({other}): prepare the folder again with azgpt prepare --overwrite")
        if meta.get("vocab_size") != tokenizer.get_vocab_size():
            raise AzGPTError(f"{where} says vocab_size {meta.get('vocab_size')} but the tokenizer has "
                             f"{tokenizer.get_vocab_size()}: prepare the folder again")
        if meta["vocab_size"] > self.vocab_size:
            raise AzGPTError(f"{self.data_dir} was prepared with vocab_size {meta['vocab_size']} but "
                             f"data.vocab_size is {self.vocab_size}, too small for its token ids: set "
                             f"data.vocab_size: {meta['vocab_size']} or point data.data_dir at a folder prepared "
                             f"with {self.vocab_size}")
        if meta["vocab_size"] < self.vocab_size:
            # BPE stops early when a small corpus runs out of merges; the model keeps the configured size.
            rank_zero_warn(f"azgpt: {self.data_dir} has a vocabulary of {meta['vocab_size']} tokens, fewer than "
                           f"data.vocab_size {self.vocab_size} (the corpus ran out of BPE merges); the model keeps "
                           f"{self.vocab_size} embedding rows. Set data.vocab_size: {meta['vocab_size']} to match.")

    def _open_tokens(self, name: str) -> np.ndarray:
        path = self.data_dir / name
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise AzGPTError(f"{path} cannot be opened as a .npy token file ({exc}): it is missing, truncated "
                             f"or not made by azgpt prepare; prepare the folder again") from None

    def _check_token_files(self, meta: dict) -> None:
        expected_dtype = token_dtype(meta["vocab_size"])
        for name, array in (("train", self._train), ("val", self._val)):
            path = self.data_dir / f"{name}.npy"
            tokens = meta.get("splits", {}).get(name, {}).get("tokens")
            if array.dtype != expected_dtype or array.ndim != 1 or len(array) != tokens:
                raise AzGPTError(f"{path} ({array.dtype}, {array.shape}) does not match meta.json "
                                 f"({expected_dtype}, {tokens} tokens): prepare the folder again")
            _check_id_range(path, array, meta["vocab_size"])
            if len(array) < self.block_size + 1:
                raise AzGPTError(f"{path} has {len(array):,} tokens, fewer than one block of block_size + 1 = "
                                 f"{self.block_size + 1:,}: lower data.block_size or add text to the corpus")

    # -- loaders ---------------------------------------------------------------------------------------

    def train_dataset(self) -> RandomTrainBlocks:
        self._require_setup()
        _, rank = self._data_parallel()
        return RandomTrainBlocks(self._train, self.block_size, self.batch_size, self.seed, rank,
                                 self._first_micro_batch())

    def val_dataset(self) -> FixedValBlocks:
        self._require_setup()
        replicas, _ = self._data_parallel()
        return FixedValBlocks(self._val, self.block_size, self.val_max_blocks, num_replicas=replicas)

    def train_eval_dataset(self) -> FixedTrainBlocks:
        """As many fixed training blocks as validation uses, for ``train_eval_loss``."""
        self._require_setup()
        replicas, _ = self._data_parallel()
        return FixedTrainBlocks(self._train, self.block_size, self.val_dataset().num_blocks, num_replicas=replicas)

    def train_dataloader(self) -> DataLoader:
        return self._train_loader(self.train_dataset())

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation blocks; while fitting, also the fixed training blocks (``train_eval_loss``)."""
        if getattr(getattr(self.trainer, "state", None), "fn", None) == TrainerFn.FITTING:
            return [self._eval_loader(self.val_dataset()), self._eval_loader(self.train_eval_dataset())]
        return self._eval_loader(self.val_dataset())

    def _require_setup(self) -> None:
        if self.meta is None:
            self.setup()
