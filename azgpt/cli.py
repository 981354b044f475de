"""The ``azgpt`` command: ``prepare`` token files, ``fit`` / ``validate`` / ``test`` with LightningCLI, then
``generate`` text and ``export`` to the Hugging Face format.

    python -m azgpt.cli prepare --corpus corpus.txt.gz --out data/mine
    python -m azgpt.cli fit --config quickstart.yaml
    python -m azgpt.cli generate --ckpt lightning_logs/version_0/checkpoints/last.ckpt --prompt "Azərbaycan"
    python -m azgpt.cli export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out azgpt-hf

A user's mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from azgpt.errors import AzGPTError, TrainingInterrupted
from azgpt.runtime import tune_malloc

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
    from azgpt.data.prepare import PrepareConfig, prepare

    args = build_prepare_parser().parse_args(argv)
    summary = prepare(PrepareConfig(
        out=args.out, corpus=args.corpus, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        seed=args.seed, tokenizer=args.tokenizer, block_size=args.block_size, text_field=args.text_field,
        errors=args.errors, overwrite=args.overwrite,
    ))
    print(summary.table())
    return 0


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path, metavar="PATH", help="checkpoint written by azgpt fit")


def build_generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azgpt generate",
        description="Continue a prompt with a trained model, printing the text as it is written. Stops at "
                    "<|endoftext|> or after --max-new-tokens tokens.",
    )
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue (cropped from the left "
                        "to the model's block size)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to add (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample among the likeliest tokens holding probability P, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="seed for reproducible sampling (sample i uses S + i - 1)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="M", help="continuations to write (default 1)")
    parser.add_argument("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1... (default: cuda if "
                        "available)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute every position at each step instead of using the KV cache (slow)")
    return parser


def run_generate(argv: list[str]) -> int:
    import random

    from azgpt.use.generate import Generator, Sampling, crop_note

    args = build_generate_parser().parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.num_samples < 1:
        raise AzGPTError(f"--num-samples must be >= 1, got {args.num_samples}")
    generator = Generator.from_checkpoint(args.ckpt, device=_device(args.device))
    ids, dropped = generator.encode_prompt(args.prompt)
    if dropped:
        print(f"azgpt: note: {crop_note(dropped + len(ids), len(ids))}", file=sys.stderr)
    prompt_text = generator.tokenizer.decode(ids, skip_special_tokens=False)
    base_seed = args.seed if args.seed is not None else random.randrange(2**31)
    out = _utf8_stdout()
    try:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                separator = "\n" if i else ""
                out.write(f"{separator}--- sample {i + 1} of {args.num_samples} (seed {base_seed + i}) ---\n")
            out.write(prompt_text)
            out.flush()
            pieces = generator.stream(ids, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                      top_k=sampling.top_k, top_p=sampling.top_p, seed=base_seed + i,
                                      use_cache=not args.no_cache)
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
            out.flush()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, without a traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _device(name: str | None):
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AzGPTError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AzGPTError(f"--device {name}: no CUDA device is available here")
    return device


def _utf8_stdout():
    """stdout that can print Azerbaijani letters even where the locale's encoding cannot."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    if encoding != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout


def build_export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azgpt export",
        description="Write a checkpoint as a Hugging Face GPT2LMHeadModel folder (config.json, model.safetensors, "
                    "tokenizer files, README.md model card). Needs safetensors, not transformers.",
    )
    add_checkpoint_argument(parser)
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    return parser


def run_export(argv: list[str]) -> int:
    from azgpt.use.export import export_checkpoint

    args = build_export_parser().parse_args(argv)
    out = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite)
    print(f"exported {args.ckpt} to {out}/ (load it with GPT2LMHeadModel.from_pretrained and "
          f"PreTrainedTokenizerFast.from_pretrained)")
    return 0


def run_training(argv: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from azgpt.train.lightning_cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except SIGTERMException:  # Lightning's own stop (outside the training loop), which would exit 0
        print("azgpt: stopped by SIGTERM outside the training loop; no checkpoint was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


COMMANDS = {"prepare": run_prepare, "generate": run_generate, "export": run_export}


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
    except TrainingInterrupted as exc:
        print(f"azgpt: {exc}", file=sys.stderr)
        return exc.exit_code
    except AzGPTError as exc:
        print(f"azgpt: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)


if __name__ == "__main__":
    sys.exit(main())
