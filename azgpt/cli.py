"""The ``azgpt`` command: ``prepare`` token files, then ``fit`` / ``validate`` / ``test`` with LightningCLI.

    python -m azgpt.cli prepare --corpus corpus.txt.gz --out data/mine
    python -m azgpt.cli fit --config quickstart.yaml

A user's mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from azgpt.errors import AzGPTError
from azgpt.runtime import tune_malloc

TRAINING_COMMANDS = ("fit", "validate", "test")
EXIT_USER_ERROR = 2


def build_prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azgpt prepare",
        description="Train (or reuse) a byte-level BPE tokenizer and write train.npy, val.npy, tokenizer.json "
                    "and meta.json for training.",
    )
    parser.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                        help=".txt, .txt.gz, .jsonl(.gz), a folder of them, or hf:NAME[:SPLIT] "
                             "(default: the sample corpus shipped with azgpt)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the token files")
    parser.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="BPE vocabulary size (default 8192)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                        help="share of documents held out for validation (default 0.05)")
    parser.add_argument("--seed", type=int, default=1337, metavar="S", help="seed of the train/val split")
    parser.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                        help="reuse this tokenizer.json instead of training one")
    parser.add_argument("--block-size", type=int, default=256, metavar="N",
                        help="context length you will train with: each split must hold one block + 1 token")
    parser.add_argument("--text-field", default="text", metavar="NAME", help="field of .jsonl records to read")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: stop with an error (strict) or replace and count (replace)")
    parser.add_argument("--overwrite", action="store_true", help="replace token files made by another tokenizer")
    return parser


def run_prepare(argv: list[str]) -> int:
    from azgpt.prepare import PrepareConfig, prepare

    args = build_prepare_parser().parse_args(argv)
    summary = prepare(PrepareConfig(
        out=args.out, corpus=args.corpus, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        seed=args.seed, tokenizer=args.tokenizer, block_size=args.block_size, text_field=args.text_field,
        errors=args.errors, overwrite=args.overwrite,
    ))
    print(summary.table())
    return 0


def run_training(argv: list[str]) -> int:
    from azgpt.training_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


COMMANDS = {"prepare": run_prepare}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``azgpt`` and ``python -m azgpt.cli``."""
    tune_malloc()  # process-wide malloc settings, see azgpt/runtime.py; AZGPT_NO_TUNING=1 opts out
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    handler = COMMANDS.get(command)
    try:
        if handler is not None:
            return handler(argv[1:])
        return run_training(argv)
    except AzGPTError as exc:
        print(f"azgpt: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
