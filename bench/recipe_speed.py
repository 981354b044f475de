"""Where the modern recipe's training step spends the time GPT-2's does not: each of its parts swapped back in turn.

    PYTHONPATH=. python bench/recipe_speed.py --threads 2
    PYTHONPATH=. python bench/recipe_speed.py --n-layer 4 --n-head 4 --n-embd 256 --batch-size 32 --profile

Times one full optimizer step (forward, backward, clipping, optimizer) of azgpt's own model and optimizer on random
tokens, fp32, for GPT-2's recipe, the modern recipe, and the modern recipe with one part set back to GPT-2's
(AdamW instead of Muon, LayerNorm, the learned position table, the GELU MLP, the tied head), and the modern recipe
with torch's own RMSNorm, rotary formula and SwiGLU in place of azgpt.fast_ops' hand-written ones. The variants run in
turns, round robin, best of ``--rounds``, so a machine that changes speed hits all alike. ``--profile`` adds
torch.profiler's table of the operators that take the time, for GPT-2 and modern. ``--compile`` times each model
compiled with ``torch.compile`` (as ``--model.compile true`` trains), which fuses the elementwise work.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import azgpt.model  # noqa: E402
from azgpt.runtime import tune_malloc  # noqa: E402
from azgpt.train.module import AzGPT  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "gpt2": {"recipe": "gpt2"},
    "modern": {"recipe": "modern"},
    "modern, adamw": {"recipe": "modern", "optimizer": "adamw"},
    "modern, layernorm": {"recipe": "modern", "norm": "layernorm"},
    "modern, learned positions": {"recipe": "modern", "position": "learned"},
    "modern, gelu": {"recipe": "modern", "mlp": "gelu"},
    "modern, tied head": {"recipe": "modern", "tie_embeddings": True},
    "modern, torch's composites": {"recipe": "modern"},
}
TORCH_COMPOSITES = "modern, torch's composites"


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def torch_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def torch_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@contextlib.contextmanager
def ops_of(name: str) -> Iterator[None]:
    """The model's RMSNorm, rotary embeddings and SwiGLU as torch computes them, for the variant that measures
    them."""
    if name != TORCH_COMPOSITES:
        yield
        return
    saved = azgpt.model.rms_norm, azgpt.model.rotate, azgpt.model.swiglu
    azgpt.model.rms_norm, azgpt.model.rotate, azgpt.model.swiglu = torch_rms_norm, torch_rotate, torch_swiglu
    try:
        yield
    finally:
        azgpt.model.rms_norm, azgpt.model.rotate, azgpt.model.swiglu = saved


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=3)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="blocks per optimizer step")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant and round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--compile", action="store_true", help="each model compiled with torch.compile")
    return p.parse_args(argv)


def build(settings: dict[str, object], args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = AzGPT(**settings, vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                   n_head=args.n_head, n_embd=args.n_embd, learning_rate=3e-3, muon_lr=0.04, dropout=0.0)
    optimizer, _ = module.build_optimizer()
    if args.compile:
        module.model.compile()
    return module.model, optimizer


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()  # as `azgpt fit` does
    print("command: PYTHONPATH=. python bench/recipe_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # every variant compiles the same forward: no silent fall back to eager past the limit
        torch._dynamo.config.recompile_limit = 4 * len(VARIANTS)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1))
    runs = {name: build(settings, args) for name, settings in VARIANTS.items()}
    for name, (model, optimizer) in runs.items():
        with ops_of(name):
            for _ in range(2):  # untimed: page faults, first-call set-up
                step(model, optimizer, tokens)
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            with ops_of(name):
                started = time.perf_counter()
                for _ in range(args.steps):
                    step(model, optimizer, tokens)
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    print(f"{args.n_layer} layers x {args.n_embd}, {args.batch_size} x {args.block_size} tokens per step, fp32, "
          f"{'compiled, ' if args.compile else ''}"
          f"{torch.get_num_threads()} threads; best of {args.rounds} rounds of {args.steps} steps")
    tokens_per_step = args.batch_size * args.block_size
    for name, seconds in best.items():
        note = "" if name in ("gpt2", "modern") else f"  (that part costs {(best['modern'] - seconds) * 1e3:+.1f} ms)"
        print(f"  {name:>26}: {seconds * 1e3:7.1f} ms/step  {tokens_per_step / seconds:9,.0f} tok/s  "
              f"{best['gpt2'] / seconds:.2f}x gpt2{note}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("gpt2", "modern"):
            model, optimizer = runs[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, optimizer, tokens)
            print(f"\n{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
