"""Score a trained model on any text: loss, perplexity and bits per byte, per file and overall.

    from azgpt.use.evaluate import evaluate
    result = evaluate("last.ckpt", ["my_texts/", "news.txt.gz"], stride=64)
    print(result.table())
    result.overall.bits_per_byte

Each file is read like ``prepare`` reads a corpus (any corpus string, normalised the same way) and encoded with
the checkpoint's own tokenizer. Its documents form one stream, each preceded by ``<|endoftext|>`` as in the
training files, and every text token of the stream is scored exactly once: in non-overlapping blocks of the
model's block size, as validation does, or with ``stride`` in overlapping windows that start every ``stride``
tokens, where a window scores only the tokens no earlier window scored (each of those then sees at least
``block_size - stride`` tokens of context). Special tokens are context only: they add neither loss nor tokens nor
bytes.

Bits per byte (total NLL / (ln 2 x UTF-8 bytes)) is the figure to compare models with different tokenizers: the
bytes of a text do not depend on the tokenizer, while loss and perplexity are per token of this one.
"""

from __future__ import annotations

import itertools
import json as json_lib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from azgpt.artifact import load_model
from azgpt.data.corpus import iter_documents, resolve_corpus_files
from azgpt.targets import PAD_TARGET  # special tokens and tokens an earlier window scored count nothing
from azgpt.data.prepare import DocumentEncoder
from azgpt.data.tokenizer import bits_per_byte
from azgpt.errors import AzGPTError
from azgpt.model import GPT
from azgpt.use.generate import parse_device, utf8_stdout

_ENCODE_BATCH_CHARS = 1 << 20  # text encoded per tokenizers call: parallel, yet little held at once
BPB_NOTE = ("bits/byte = total NLL / (ln 2 x UTF-8 bytes) compares models with different tokenizers; "
            "loss and perplexity are per token of this checkpoint's tokenizer")


@dataclass
class Score:
    """What one file (or all of them) scored: counts and the total negative log-likelihood in nats."""

    name: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0

    @property
    def loss(self) -> float:
        """Mean NLL per scored token (nats)."""
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.loss)
        except OverflowError:
            return math.inf

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.bytes) if self.bytes else math.nan

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@dataclass
class Evaluation:
    """Scores of every file and of all together, with the settings that produced them."""

    checkpoint: str
    block_size: int
    stride: int
    files: list[Score] = field(default_factory=list)

    @property
    def overall(self) -> Score:
        """Sums over the files: the loss is token-weighted, bits per byte byte-weighted."""
        total = Score("all")
        for score in self.files:
            total.documents += score.documents
            total.tokens += score.tokens
            total.bytes += score.bytes
            total.nll += score.nll
        return total

    def as_dict(self) -> dict[str, object]:
        return {"checkpoint": self.checkpoint, "block_size": self.block_size, "stride": self.stride,
                "files": [score.as_dict() for score in self.files], "overall": self.overall.as_dict()}

    def to_json(self) -> str:
        """``as_dict`` as strict JSON: a non-finite number (a perplexity above e^709, the loss of no tokens)
        becomes ``null``, since ``Infinity`` and ``NaN`` are not JSON."""
        return json_lib.dumps(_finite_or_null(self.as_dict()), indent=2, ensure_ascii=False, allow_nan=False)

    @staticmethod
    def _row(score: Score, width: int) -> str:
        return (f"{score.name:<{width}}  {score.documents:>9,}  {score.tokens:>12,}  {score.bytes:>13,}  "
                f"{score.loss:>7.4f}  {score.perplexity:>10.2f}  {score.bits_per_byte:>9.4f}")

    def table(self) -> str:
        """A text table: one row per file, then the overall row, then what bits per byte is for."""
        width = max(len("file"), *(len(score.name) for score in self.files))
        header = (f"{'file':<{width}}  {'documents':>9}  {'tokens':>12}  {'bytes':>13}  {'loss':>7}  "
                  f"{'perplexity':>10}  {'bits/byte':>9}")
        rule = "-" * len(header)
        lines = [header, rule, *(self._row(score, width) for score in self.files), rule, self._row(self.overall, width)]
        windows = "non-overlapping blocks" if self.stride == self.block_size else f"stride {self.stride}"
        lines += ["", f"{self.checkpoint}: block size {self.block_size}, {windows}", BPB_NOTE]
        return "\n".join(lines)


def _finite_or_null(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


def iter_windows(chunks: Iterable[np.ndarray], block_size: int, stride: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) windows over the token stream ``chunks`` joined, streamed.

    Windows start at 0, stride, 2 x stride, ... and hold ``block_size`` inputs and the next tokens as targets;
    targets an earlier window already scored are ``PAD_TARGET``, so each token is scored once. Only the last
    window may be shorter than ``block_size``. ``stride == block_size`` gives non-overlapping blocks.
    """
    buffer = np.empty(0, dtype=np.int64)
    start = 0  # stream position of buffer[0], where the next window starts
    scored = 0  # stream positions 1..scored have been scored as targets
    for chunk in chunks:
        buffer = np.concatenate([buffer, chunk])
        while len(buffer) > block_size:  # a full window: block_size inputs, each with its target
            yield _window(buffer[: block_size + 1], start, scored)
            scored = start + block_size
            buffer, start = buffer[stride:], start + stride
    if start + len(buffer) - 1 > scored:
        yield _window(buffer, start, scored)


def _window(tokens: np.ndarray, start: int, scored: int) -> tuple[np.ndarray, np.ndarray]:
    targets = tokens[1:].copy()
    targets[: max(0, scored - start)] = PAD_TARGET
    return tokens[:-1], targets


class Scorer:
    """A model and its tokenizer, turning documents into a ``Score`` with batched forward passes."""

    def __init__(self, model: GPT, tokenizer, stride: int | None = None, batch_size: int = 8) -> None:
        block_size = model.config.block_size
        stride = block_size if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
            raise AzGPTError(f"--stride must be an integer from 1 to the model's block size {block_size}, got {stride!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AzGPTError(f"--batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.eval()
        self.encoder = DocumentEncoder(tokenizer)
        self.block_size, self.stride, self.batch_size = block_size, stride, batch_size
        special = [index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special]
        self.special_ids = np.array(sorted(special), dtype=np.int64)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def score(self, name: str, documents: Iterable[str]) -> Score:
        """Score one stream of documents (each preceded by end-of-text)."""
        result = Score(name)
        self.score_tokens(self._chunks(documents, result), result)
        return result

    def score_tokens(self, chunks: Iterable[np.ndarray], result: Score) -> None:
        """Add the NLL and count of every text token of the stream ``chunks`` joined to ``result``."""
        windows = iter_windows(chunks, self.block_size, self.stride)
        while batch := list(itertools.islice(windows, self.batch_size)):
            self._score_batch(batch, result)

    def _chunks(self, documents: Iterable[str], result: Score) -> Iterator[np.ndarray]:
        """Token ids of the documents, a batch at a time; counts documents and bytes into ``result``."""
        pending: list[str] = []
        chars = 0
        for document in itertools.chain(documents, [None]):
            if document is not None:
                pending.append(document)
                chars += len(document)
                result.documents += 1
                result.bytes += len(document.encode("utf-8"))
            if pending and (document is None or chars >= _ENCODE_BATCH_CHARS):
                ids = [[self.encoder.eot, *doc_ids] for doc_ids in self.encoder.encode_documents(pending)]
                yield np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
                pending, chars = [], 0

    @torch.inference_mode()
    def _score_batch(self, windows: list[tuple[np.ndarray, np.ndarray]], result: Score) -> None:
        inputs = np.zeros((len(windows), max(len(w[0]) for w in windows)), dtype=np.int64)
        targets = np.full_like(inputs, PAD_TARGET)
        for row, (window_inputs, window_targets) in enumerate(windows):
            inputs[row, : len(window_inputs)] = window_inputs  # padding sits after the window: causal, so unseen
            targets[row, : len(window_targets)] = window_targets
        targets[np.isin(targets, self.special_ids)] = PAD_TARGET
        logits, _ = self.model(torch.from_numpy(inputs).to(self.device))
        flat = torch.from_numpy(targets).to(self.device).view(-1)
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), flat, ignore_index=PAD_TARGET, reduction="sum")
        result.nll += float(nll.double())
        result.tokens += int((flat != PAD_TARGET).sum())


def evaluate(checkpoint: str | Path, corpus: str | Path | Sequence[str | Path], *, stride: int | None = None,
             batch_size: int = 8, device: str | torch.device | None = None, max_docs: int | None = None,
             text_field: str = "text", errors: str = "strict") -> Evaluation:
    """Score ``checkpoint`` on every file of ``corpus`` (any corpus string ``prepare`` accepts, or a list).

    ``stride``: None for non-overlapping blocks, else overlapping windows every ``stride`` tokens.
    ``max_docs``: score only the first N documents of each file. Returns an ``Evaluation`` whose ``files``
    hold one ``Score`` per file and whose ``overall`` sums them.
    """
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise AzGPTError(f"--max_docs must be a positive integer, got {max_docs!r}")
    files = resolve_corpus_files(corpus)  # every path checked before any work
    loaded = load_model(checkpoint)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scorer = Scorer(loaded.build_model(device), loaded.tokenizer, stride=stride, batch_size=batch_size)
    for file in files:
        if next(iter_documents(file, text_field=text_field, errors=errors), None) is None:
            raise AzGPTError(f"{file} has no text (empty or only whitespace): there is nothing to evaluate in it; "
                             f"remove it from --corpus")
    result = Evaluation(checkpoint=str(checkpoint), block_size=scorer.block_size, stride=scorer.stride)
    for file in files:
        documents = iter_documents(file, text_field=text_field, errors=errors)
        result.files.append(scorer.score(file, itertools.islice(documents, max_docs)))
    return result


def evaluate_command(ckpt: Path, corpus: list[str], stride: int | None = None, batch_size: int = 8,
                     device: str | None = None, max_docs: int | None = None, json: bool = False,
                     text_field: str = "text", errors: str = "strict") -> int:
    """Loss, perplexity and bits per byte of a checkpoint on any text, per file and overall.
    Bits per byte compares models with different tokenizers; loss and perplexity are per token of this one.

    Args:
        ckpt: checkpoint written by azgpt fit.
        corpus: text to score: files, folders, or any corpus string prepare accepts; each file gets a row.
        stride: overlapping windows starting every STRIDE tokens, each token scored once with at least
            block_size - STRIDE tokens of context (default: non-overlapping blocks of the block size, as validation).
        batch_size: windows per forward pass.
        device: cpu, cuda, cuda:1... (default: cuda if available).
        max_docs: score only the first N documents of each file.
        json: print the results as JSON instead of a table.
        text_field: field holding the text in .jsonl files and datasets.
        errors: strict (invalid UTF-8 is an error) or replace.
    """
    result = evaluate(ckpt, corpus, stride=stride, batch_size=batch_size, device=parse_device(device),
                      max_docs=max_docs, text_field=text_field, errors=errors)
    out = utf8_stdout()
    out.write((result.to_json() if json else result.table()) + "\n")
    out.flush()
    return 0
