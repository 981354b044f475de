"""Benchmark ``azgpt prepare`` against the same work done with bare ``tokenizers`` calls.

    python bench/prepare.py [--corpus-dir ../shared/corpus] [--rounds 2]

Each run is a fresh subprocess (peak RSS from ``os.wait4``); azgpt and the bare baseline alternate,
so a busy machine slows both alike. Reported per run: tokenizer training MB/s, encoding MB/s (MB of
UTF-8 text), end-to-end wall time of the subprocess (interpreter start and imports included) and peak
RSS, on web+legal+quran (about 11.6 MB) and on web alone (about 2 MB). To show what peak RSS depends on,
azgpt also runs once on web repeated five times (10 MB, the same distinct words as web) and once with a
reused tokenizer (``--tokenizer``: reading, encoding and writing only) on both corpora.

The bare baseline is what a ``tokenizers`` user writes by hand: read the .gz files in text mode; train
the same byte-level BPE (same normaliser, pre-tokenizer, vocab, special token) with
``train_from_iterator`` on batches of 1,000 lines; cut documents at blank lines; ``encode_batch_fast``
(offsets skipped) on batches of 1,000 documents; append end-of-text ids and write every 20th document to
val, the rest to train, with numpy. Its only normalisation is the tokenizer's own (NFC and schwa folding,
in Rust); unlike azgpt it keeps control characters, counts no words, writes no meta.json and uses no
temporary names.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGE = ("web.txt.gz", "legal.txt.gz", "quran.txt.gz")
SMALL = ("web.txt.gz",)


def run_azgpt(files: list[str], out: Path, vocab_size: int, tokenizer: str | None = None) -> dict:
    from azgpt.data.prepare import PrepareConfig, prepare

    summary = prepare(PrepareConfig(out=out, corpus=files, vocab_size=vocab_size, tokenizer=tokenizer and Path(tokenizer),
                                    overwrite=True))
    print(summary.table(), file=sys.stderr)
    return {"mb": sum(c.bytes for c in summary.splits.values()) / 1e6,
            "train_s": summary.tokenizer_seconds if summary.tokenizer_trained else None,
            "encode_s": summary.encode_seconds}


def run_bare(files: list[str], out: Path, vocab_size: int) -> dict:

    import numpy as np
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def lines():
        for path in files:
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                yield from handle

    def documents():
        block: list[str] = []
        for line in lines():
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")

    def batches(items, size=1000):
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace("\u04d9", "\u0259"), normalizers.Replace("\u04d8", "\u018f")])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(batches(lines()), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    eot = tokenizer.token_to_id("<|endoftext|>")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    text_bytes, index = 0, 0
    with open(out / "train.bin", "wb") as train, open(out / "val.bin", "wb") as val:
        for batch in batches(documents()):
            text_bytes += sum(len(d.encode("utf-8")) for d in batch)
            for encoding in encode(batch, add_special_tokens=False):
                ids = np.array(encoding.ids + [eot], dtype=dtype)
                ids.tofile(val if index % 20 == 0 else train)
                index += 1
    return {"mb": text_bytes / 1e6, "train_s": train_s, "encode_s": time.perf_counter() - started}


def child(args: argparse.Namespace) -> None:
    if args.child == "bare":
        result = run_bare(args.files, Path(args.out), args.vocab_size)
    else:
        result = run_azgpt(args.files, Path(args.out), args.vocab_size, args.tokenizer)
    print(json.dumps(result))


def measure(kind: str, files: list[str], vocab_size: int, out: Path, tokenizer: Path | None = None) -> dict:
    """One run in a fresh interpreter: its own timings, its wall time, CPU time and peak RSS (``os.wait4``)."""
    out.mkdir()
    command = [sys.executable, __file__, "--child", "bare" if kind == "bare" else "azgpt", "--out", str(out),
               "--vocab-size", str(vocab_size), *files]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{kind} run failed ({' '.join(map(shlex.quote, command))}):\n{stderr.read()}")
        result = json.loads(stdout.read().strip().splitlines()[-1])
    result.update(kind=kind, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, rss_mb=usage.ru_maxrss / 1024)
    return result


def row(corpus: str, r: dict) -> str:
    train = f"{r['mb'] / r['train_s']:10.2f}" if r["train_s"] else f"{'-':>10}"
    return (f"{corpus:<8} {r['kind']:<12} {r['mb']:>6.2f} {train} {r['mb'] / r['encode_s']:>10.2f} "
            f"{r['wall_s']:>9.2f} {r['cpu_s']:>7.2f} {r['rss_mb']:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-dir", type=Path, default=ROOT.parent / "shared" / "corpus")
    parser.add_argument("--rounds", type=int, default=2, help="alternating azgpt/bare rounds per corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--child", choices=("azgpt", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    corpora = {"large": [str(args.corpus_dir / f) for f in LARGE], "small": [str(args.corpus_dir / f) for f in SMALL]}
    missing = [f for files in corpora.values() for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"missing corpus files {missing}: pass --corpus-dir pointing at shared/corpus")
    print("reproduce: " + " ".join(map(shlex.quote, ["python", "bench/prepare.py",
          "--corpus-dir", str(args.corpus_dir), "--rounds", str(args.rounds), "--vocab-size", str(args.vocab_size)])))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; vocab {args.vocab_size}")
    print(f"{'corpus':<8} {'run':<12} {'MB':>6} {'train MB/s':>10} {'enc MB/s':>10} {'e2e s':>9} {'CPU s':>7} {'RSS MB':>8}")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="azgpt-bench-") as work_dir:
        work = Path(work_dir)
        runs = 0

        def run(kind: str, corpus: str, files: list[str], tokenizer: Path | None = None) -> dict:
            nonlocal runs
            runs += 1
            out = work / f"run{runs}"
            result = measure(kind, files, args.vocab_size, out, tokenizer)
            results.setdefault((corpus, kind), []).append(result)
            print(row(corpus, result), flush=True)
            if kind == "azgpt" and corpus == "large" and not (work / "tokenizer.json").exists():
                shutil.copy(out / "tokenizer.json", work / "tokenizer.json")
            shutil.rmtree(out)
            return result

        for round_ in range(args.rounds):
            kinds = ("azgpt", "bare") if round_ % 2 == 0 else ("bare", "azgpt")
            for corpus in ("large", "small"):
                for kind in kinds:
                    run(kind, corpus, corpora[corpus])
        web5 = work / "web5.txt.gz"
        with gzip.open(corpora["small"][0], "rb") as source, gzip.open(web5, "wb", compresslevel=1) as target:
            text = source.read()
            for _ in range(5):
                target.write(text.rstrip(b"\n") + b"\n\n")
        run("azgpt", "web x5", [str(web5)])
        for corpus in ("small", "large"):
            run("azgpt-encode", corpus, corpora[corpus], work / "tokenizer.json")
    print(f"load average {os.getloadavg()[0]:.1f} at end")

    print("\nmedians over rounds (RSS: max)")
    for corpus in ("large", "small"):
        for kind in ("azgpt", "bare"):
            rs = results[(corpus, kind)]
            print(f"{corpus:<6} {kind:<6} train {statistics.median(r['mb'] / r['train_s'] for r in rs):5.2f} MB/s, "
                  f"encode {statistics.median(r['mb'] / r['encode_s'] for r in rs):5.2f} MB/s, "
                  f"end-to-end {statistics.median(r['wall_s'] for r in rs):6.2f} s "
                  f"(CPU {statistics.median(r['cpu_s'] for r in rs):6.2f} s), "
                  f"peak RSS {max(r['rss_mb'] for r in rs):5.0f} MB")
    pairs = list(zip(results[("large", "azgpt")], results[("large", "bare")]))
    wall = [a["wall_s"] / b["wall_s"] for a, b in pairs]
    cpu = [a["cpu_s"] / b["cpu_s"] for a, b in pairs]
    print(f"\nazgpt / bare end-to-end wall time on web+legal+quran, per round: " + ", ".join(f"{x:.2f}x" for x in wall)
          + f" (median {statistics.median(wall):.2f}x; target <= 1.30x)")
    print(f"azgpt / bare CPU seconds (user+sys; steadier on a busy machine), per round: "
          + ", ".join(f"{x:.2f}x" for x in cpu) + f" (median {statistics.median(cpu):.2f}x)")

    def peak(corpus: str, kind: str) -> float:
        return max(r["rss_mb"] for r in results[(corpus, kind)])

    print(f"peak RSS, azgpt prepare: web (2.0 MB) {peak('small', 'azgpt'):.0f} MB, web x5 (10.2 MB, same words) "
          f"{peak('web x5', 'azgpt'):.0f} MB, web+legal+quran (11.7 MB) {peak('large', 'azgpt'):.0f} MB")
    print(f"peak RSS, azgpt with a reused tokenizer (read+encode+write only): web {peak('small', 'azgpt-encode'):.0f} MB,"
          f" web+legal+quran {peak('large', 'azgpt-encode'):.0f} MB")
    print(f"peak RSS, bare tokenizers: web {peak('small', 'bare'):.0f} MB, web+legal+quran {peak('large', 'bare'):.0f} MB")


if __name__ == "__main__":
    main()
