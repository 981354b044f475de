"""InstructionDataModule: conversations from jsonl, rendered with the chat template, for ``azgpt finetune``.

Each conversation becomes one row of at most ``block_size + 1`` token ids; targets outside the assistant's
replies are ``PAD_TARGET``, so the loss (and validation's NLL and byte counts) cover response tokens only.
Rows are padded to the longest in their batch. Drawn and split across processes as pretraining blocks are
(``azgpt.data.loading``): a resumed fine-tune draws exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from azgpt.data.chat import DEFAULT_TEMPLATE, ChatTemplate, read_conversations, sample_instructions_path
from azgpt.data.loading import EndlessBatches, IndexedDataModule, padded_length
from azgpt.data.tokenizer import tokenizer_from_json, tokenizer_sha256
from azgpt.errors import AzGPTError
from azgpt.targets import PAD_TARGET

Example = tuple[list[int], list[int]]  # (input ids, target ids) of one conversation


def make_example(ids: list[int], response: list[bool], block_size: int) -> Example | None:
    """Inputs and masked targets of one rendered conversation, cut to ``block_size``; None if no reply is left."""
    ids, response = ids[: block_size + 1], response[: block_size + 1]
    targets = [token if is_reply else PAD_TARGET for token, is_reply in zip(ids[1:], response[1:])]
    if all(t == PAD_TARGET for t in targets):
        return None  # a row with nothing to learn would make a NaN mean loss
    return ids[:-1], targets


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad rows to the longest: inputs with ``pad_id``, targets with ``PAD_TARGET`` (not counted)."""
    length = max(len(inputs) for inputs, _ in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), length), PAD_TARGET, dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        inputs[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(target)] = torch.tensor(target)
    return inputs, targets


class RandomExamples(EndlessBatches):
    """Endless micro-batches of conversations drawn at random, from a given micro-batch index on."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 start_index: int = 0) -> None:
        super().__init__(batch_size, seed, rank, start_index)
        self.examples = examples
        self.pad_id = pad_id

    def batch_at(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(index, len(self.examples))
        return collate([self.examples[int(r)] for r in rows], self.pad_id)


class FixedExamples(Dataset):
    """The held-out conversations, padded to a multiple of ``num_replicas`` with rows that count for nothing."""

    def __init__(self, examples: list[Example], num_replicas: int = 1) -> None:
        self.examples = examples
        self.padded_length = padded_length(len(examples), num_replicas)

    def __len__(self) -> int:
        return self.padded_length

    def __getitem__(self, index: int) -> Example:
        if index < len(self.examples):
            return self.examples[index]
        inputs, targets = self.examples[0]
        return inputs, [PAD_TARGET] * len(targets)


class InstructionDataModule(IndexedDataModule):
    """Instruction conversations for supervised fine-tuning.

    Args:
        tokenizer_json: the model's tokenizer, chat template tokens included (``azgpt finetune`` links it from
            the model: ``AzGPTFinetune.tokenizer_json``).
        block_size: the model's context length (linked from ``model.block_size``).
        chat_template: the template to render with (``ChatTemplate.to_dict()``; linked from the model).
        files: jsonl files of ``{"prompt", "response"}`` or ``{"messages": [...]}`` lines; None means the
            Azerbaijani sample shipped with azgpt.
        batch_size: conversations per micro-batch (per device).
        seed: seed of the training draws and of the train/validation split.
        val_fraction: share of conversations held out for validation (at least one).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, tokenizer_json: str | None = None, block_size: int | None = None,
                 chat_template: dict | None = None, files: list[str] | None = None, batch_size: int = 16,
                 seed: int = 1337, val_fraction: float = 0.1, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AzGPTError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise AzGPTError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
        if tokenizer_json is None or block_size is None:
            raise AzGPTError("InstructionDataModule needs the model's tokenizer_json and block_size (azgpt finetune "
                             "links them from model.init_from's checkpoint)")
        self.template = ChatTemplate.from_dict(chat_template) if chat_template else DEFAULT_TEMPLATE
        self.tokenizer = self.template.add_to_tokenizer(tokenizer_from_json(tokenizer_json, "the model"))
        self.block_size = block_size
        self.files = [Path(f) for f in files] if files else [sample_instructions_path()]
        self.data_dir = self.files[0].parent  # where the data is, for messages that name it (as AzGPTDataModule's)
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.tokenizer_json = self.tokenizer.to_str()  # AzGPT.setup checks it is the model's
        self.meta: dict | None = None
        self.pad_id = 0
        self._train: list[Example] = []
        self._val: list[Example] = []

    def setup(self, stage: str | None = None) -> None:
        if self.meta is not None:
            return
        tokenizer = self.tokenizer
        self.pad_id = self.template.token_ids(tokenizer)["eot"]
        conversations = read_conversations(self.files)
        examples = [make_example(*self.template.encode(tokenizer, messages), self.block_size)
                    for messages in conversations]
        kept = [e for e in examples if e is not None]
        if len(kept) < len(examples):
            rank_zero_warn(f"azgpt: {len(examples) - len(kept)} conversations have no reply within the block size "
                           f"{self.block_size} and are left out")
        if len(kept) < 2:
            raise AzGPTError(f"{', '.join(map(str, self.files))}: need at least 2 conversations with a reply that "
                             f"fits the block size ({self.block_size} tokens), found {len(kept)}")
        order = np.random.default_rng(self.seed).permutation(len(kept))
        n_val = min(len(kept) - 1, max(1, round(len(kept) * self.val_fraction)))
        self._val = [kept[i] for i in sorted(order[:n_val])]
        self._train = [kept[i] for i in sorted(order[n_val:])]
        self.meta = self._summary(tokenizer)
        rank_zero_info(f"azgpt finetune: {len(self._train)} training and {len(self._val)} validation conversations "
                       f"from {', '.join(map(str, self.files))} ({self.meta['splits']['train']['tokens']:,} "
                       f"response tokens to learn from)")

    def _summary(self, tokenizer) -> dict:
        """meta.json's shape, so AzGPT records what it was fine-tuned on as it records pretraining data."""
        def counted(examples: list[Example]) -> int:
            return sum(sum(t != PAD_TARGET for t in targets) for _, targets in examples)

        return {"source": [str(f) for f in self.files], "normalization": self.template.to_dict()["format"],
                "tokenizer_sha256": tokenizer_sha256(tokenizer), "vocab_size": tokenizer.get_vocab_size(),
                "splits": {"train": {"tokens": counted(self._train), "conversations": len(self._train)},
                           "val": {"tokens": counted(self._val), "conversations": len(self._val)}}}

    def train_dataloader(self) -> DataLoader:
        self.setup()
        _, rank = self._data_parallel()
        return self._train_loader(RandomExamples(self._train, self.batch_size, self.seed, self.pad_id, rank,
                                                 self._first_micro_batch()))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        replicas, _ = self._data_parallel()
        return self._eval_loader(FixedExamples(self._val, replicas), partial(collate, pad_id=self.pad_id))
