"""How much text the BPE tokenizer needs: train on the first N MB of a corpus, measure the time and the
tokens per word every tokenizer gives on held-out documents, against training on all the rest.

    PYTHONPATH=. python bench/tokenizer_sample.py [--corpus-dir ../shared/corpus] [--vocab_size 8192] [--rounds 3]

Documents are taken round-robin across the corpus files (a mixed stream, as a shuffled Hub corpus is). Every
10th document (about 10% of the text) is held out: no tokenizer trains on it, and tokens per word are counted
on it. The samples are the first of the other documents up to each size, the way ``prepare --tokenizer_sample``
takes them. Sizes run in alternating order over the rounds so a busy machine slows all of them alike; the
time reported is the fastest round. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

from azgpt.data.corpus import iter_documents
from azgpt.data.tokenizer import split_at_line_breaks, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def interleaved(files: list[Path]) -> list[str]:
    streams = [list(iter_documents(f)) for f in files]
    return [d for group in itertools.zip_longest(*streams) for d in group if d is not None]


def first_bytes(documents: list[str], limit: float) -> list[str]:
    taken, size = [], 0
    for document in documents:
        taken.append(document)
        size += len(document.encode("utf-8"))
        if size >= limit:
            break
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[2, 5, 10])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("command: PYTHONPATH=. python bench/tokenizer_sample.py " + shlex.join(sys.argv[1:]))
    everything = interleaved(sorted(args.corpus_dir.glob("*.txt*")))
    held = everything[::10]
    documents = [d for i, d in enumerate(everything) if i % 10]
    total_mb = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    words = sum(len(d.split()) for d in held)
    pieces = [p for d in held for p in split_at_line_breaks(d)]
    sizes = [s for s in args.sizes_mb if s < total_mb] + [total_mb]
    best: dict[float, float] = {}
    tokens: dict[float, int] = {}
    for round_index in range(args.rounds):
        for size in sizes if round_index % 2 == 0 else reversed(sizes):
            sample = first_bytes(documents, size * 1e6)
            started = time.perf_counter()
            tokenizer = train_tokenizer(sample, args.vocab_size, normalized=True)
            best[size] = min(best.get(size, float("inf")), time.perf_counter() - started)
            tokens[size] = sum(len(e.ids) for e in tokenizer.encode_batch(pieces))
    print(f"corpus: {args.corpus_dir} ({total_mb:.1f} MB to train on; tokens per word on {words:,} words of "
          f"every 10th document, held out), vocab {args.vocab_size}, best of {args.rounds} rounds")
    print(f"{'sample MB':>10} {'train s':>8} {'tokens/word':>12} {'vs all':>8}")
    for size in sizes:
        print(f"{size:>10.1f} {best[size]:>8.1f} {tokens[size] / words:>12.3f} "
              f"{tokens[size] / tokens[total_mb] - 1:>+8.2%}")


if __name__ == "__main__":
    main()
