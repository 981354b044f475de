"""azgpt serve under load: tokens/s and first-token latency with 1, 4 and 16 concurrent streaming clients.

    PYTHONPATH=. python bench/serve_throughput.py --ckpt lightning_logs/version_0/checkpoints/last.ckpt

Starts ``azgpt serve`` as its own process (the clients here would otherwise share its interpreter), then, for
each concurrency level, runs that many client threads at once, each sending ``--requests`` streamed chat requests
one after the other. Tokens are the server's own usage counts (``stream_options.include_usage``); tokens/s is
all clients' completion tokens over the level's wall time; first-token latency is from sending a request to its
first piece of text. The server interleaves running requests token by token (no batched forward pass), so more
clients share the same tokens/s and each waits longer for its tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    return parser.parse_args(argv)


@dataclass
class Result:
    first_token_s: float
    tokens: int


def one_request(url: str, index: int, max_tokens: int) -> Result:
    body = {"messages": [{"role": "user", "content": f"Salam! Bakı haqqında danış ({index})."}], "stream": True,
            "max_tokens": max_tokens, "seed": index, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return Result(first if first is not None else time.perf_counter() - start, tokens)


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, list[Result]]:
    results: list[Result] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            result = one_request(url, c * requests + r, max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results


def start_server(args: argparse.Namespace, most: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "azgpt.cli", "serve", "--ckpt", args.ckpt, "--port", "0", "--device",
               args.device, "--max_parallel", str(most), "--max_queue", str(most)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    line = server.stderr.readline()
    if " at http://" not in line:
        server.kill()
        sys.exit(f"the server did not start: {line}{server.stderr.read()}")
    return server, line.split(" at ")[1].split()[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]
    given = sys.argv[1:] if argv is None else argv
    print("command: PYTHONPATH=. python bench/serve_throughput.py " + shlex.join(given))
    server, url = start_server(args, max(levels))
    try:
        one_request(url, 0, 4)  # warm-up, untimed
        print(f"server: {url}, model {args.ckpt}, {args.max_tokens} max tokens per reply, {args.requests} requests "
              f"per client, device {args.device}")
        print(f"{'clients':>7}  {'requests':>8}  {'tokens':>7}  {'wall s':>7}  {'tokens/s':>9}  "
              f"{'first token median s':>20}  {'p90 s':>6}")
        for clients in levels:
            wall, results = run_level(url, clients, args.requests, args.max_tokens)
            tokens = sum(r.tokens for r in results)
            firsts = sorted(r.first_token_s for r in results)
            p90 = firsts[min(len(firsts) - 1, int(0.9 * len(firsts)))]
            print(f"{clients:>7}  {len(results):>8}  {tokens:>7}  {wall:>7.2f}  {tokens / wall:>9.1f}  "
                  f"{statistics.median(firsts):>20.3f}  {p90:>6.3f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
