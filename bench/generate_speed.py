"""Decoding speed with and without the KV cache: tokens generated per second, greedy, batch 1.

    PYTHONPATH=. python bench/generate_speed.py            # quickstart width, block 512, 256 new tokens

The model is randomly initialised (speed does not depend on the weights) with the quickstart config's width
(4 layers, 4 heads, n_embd 128, vocab 2048) but a 512-token block, so that prompt + 256 new tokens fit and
the cache is used for every step. Runs alternate between the two paths so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from azgpt.model import GPT, GPTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def decode_seconds(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    """Wall time to generate ``new_tokens`` greedy tokens (prompt processing included)."""
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    produced = 0
    for _ in model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache):
        produced += 1
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    assert produced == new_tokens
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt_tokens + args.new_tokens > args.block_size:
        sys.exit(f"--block-size {args.block_size} is smaller than prompt + new tokens "
                 f"({args.prompt_tokens + args.new_tokens}): the cache would be abandoned midway")
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(args.device).eval()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_tokens), device=args.device)

    for use_cache in (True, False):  # warm-up: allocator, kernels
        decode_seconds(model, prompt, 8, use_cache)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            times[use_cache].append(decode_seconds(model, prompt, args.new_tokens, use_cache))

    rates = {use_cache: args.new_tokens / statistics.median(seconds) for use_cache, seconds in times.items()}
    print(f"model: {config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, vocab "
          f"{config.vocab_size}, block {config.block_size}; {model.num_params(non_embedding=False) / 1e6:.2f} M "
          f"parameters; device {args.device}, {torch.get_num_threads()} threads")
    print(f"greedy decoding of {args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, batch 1, "
          f"median of {args.repeats} runs:")
    for use_cache, label in ((True, "with KV cache"), (False, "without cache")):
        runs = ", ".join(f"{s:.2f}s" for s in times[use_cache])
        print(f"  {label}: {rates[use_cache]:8.1f} tokens/s  (runs: {runs})")
    print(f"  speed-up from the cache: {rates[True] / rates[False]:.1f}x")
    print("reproduce: PYTHONPATH=. python bench/generate_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
