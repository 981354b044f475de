"""``azgpt prepare`` with 1 and with 2 encoding threads (``tokenizers``' Rust pool, ``RAYON_NUM_THREADS``) on a
whole corpus folder: end-to-end MB/s (tokenizer training included) and encoding MB/s with a reused tokenizer.

    PYTHONPATH=. python bench/prepare_workers.py [--corpus-dir ../shared/corpus] [--threads 1 2] [--rounds 2]

Every run is a fresh subprocess; thread counts alternate within each round, so a busy machine slows all
of them alike. The figures are prepare's own (its summary line), MB of UTF-8 text per second.

On a machine too busy for wall-clock ratios, ``--cpu-split`` measures instead where encoding's CPU time goes:
one thread, process CPU time in ``encode_batch`` (Rust, parallel) against the rest (reading, normalising,
counting, writing: Python, serial), and the speed-up that split allows on idle cores (Amdahl's law).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SUMMARY = re.compile(r"encoded in ([\d.]+)s \(([\d.]+) MB/s\); total ([\d.]+)s for ([\d.]+) MB")


def run(corpus: Path, out: Path, threads: int, tokenizer: Path | None) -> dict[str, float]:
    command = [sys.executable, "-m", "azgpt.cli", "prepare", "--corpus", str(corpus), "--out", str(out),
               "--vocab_size", "8192", "--overwrite"]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAYON_NUM_THREADS": str(threads),
           "RAYON_RS_NUM_CPUS": str(threads), "TQDM_DISABLE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    encode_s, encode_rate, total_s, mb = map(float, _SUMMARY.search(result.stdout).groups())
    return {"encode_mb_s": encode_rate, "total_s": total_s, "mb": mb, "total_mb_s": mb / total_s}


def cpu_split(corpus: Path, tokenizer: Path, out: Path) -> None:
    """Encode ``corpus`` with one thread and print how its CPU time splits between encode_batch and the rest."""
    import time

    from azgpt.data import prepare as prepare_module

    in_rust = [0.0]
    original_init = prepare_module._BatchEncoder.__init__

    def timed_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        encode = self._encode

        def timed(*a, **k):
            started = time.process_time()
            try:
                return encode(*a, **k)
            finally:
                in_rust[0] += time.process_time() - started

        self._encode = timed

    prepare_module._BatchEncoder.__init__ = timed_init
    started = time.process_time()
    summary = prepare_module.prepare(prepare_module.PrepareConfig(out=out, corpus=[str(corpus)], tokenizer=tokenizer,
                                                                  overwrite=True))
    cpu = time.process_time() - started
    mb = sum(c.bytes for c in summary.splits.values()) / 1e6
    for cores in sorted({1, 2, os.cpu_count() or 1}):
        print(f"encode only, {cores} idle core(s): {mb / (cpu - in_rust[0] + in_rust[0] / cores):.2f} MB/s "
              f"(CPU {cpu:.1f} s for {mb:.1f} MB, {in_rust[0] / cpu:.0%} of it in encode_batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpu-split", action="store_true", help="CPU-time split and Amdahl estimate instead")
    args = parser.parse_args()
    print("command: PYTHONPATH=. python bench/prepare_workers.py " + shlex.join(sys.argv[1:]))
    if args.cpu_split:
        os.environ.update(RAYON_NUM_THREADS="1", RAYON_RS_NUM_CPUS="1", TQDM_DISABLE="1")  # before the pool starts
        with tempfile.TemporaryDirectory() as tmp:
            run(args.corpus_dir, Path(tmp) / "reference", 1, None)
            cpu_split(args.corpus_dir, Path(tmp) / "reference" / "tokenizer.json", Path(tmp) / "encoded")
        return
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference"
        run(args.corpus_dir, reference, max(args.threads), None)
        for round_index in range(args.rounds):
            order = args.threads if round_index % 2 == 0 else list(reversed(args.threads))
            for threads in order:
                for mode, tokenizer in (("train+encode", None), ("encode only", reference / "tokenizer.json")):
                    out = Path(tmp) / f"{mode[0]}{threads}"
                    results.setdefault((mode, threads), []).append(run(args.corpus_dir, out, threads, tokenizer))
    mb = next(iter(results.values()))[0]["mb"]
    print(f"corpus: {args.corpus_dir} ({mb:.1f} MB of text), vocab 8192, {os.cpu_count()} CPUs, best of {args.rounds}")
    for (mode, threads), runs in results.items():
        print(f"{mode:<13} threads {threads}: end-to-end {max(r['total_mb_s'] for r in runs):.2f} MB/s "
              f"({min(r['total_s'] for r in runs):.1f} s), encoding {max(r['encode_mb_s'] for r in runs):.2f} MB/s")


if __name__ == "__main__":
    main()
