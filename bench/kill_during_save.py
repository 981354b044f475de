"""kill -9 a process while it writes checkpoints: how many .ckpt files are left broken, and is last.ckpt lost?

Compares Lightning's stock ``TorchCheckpointIO`` with azgpt's ``AtomicCheckpointIO``, with ``TMPDIR`` on the
checkpoint's filesystem and on another one (``/dev/shm`` when it is another filesystem). A forked child
writes ``last.ckpt`` and ``step-N.ckpt`` in a loop; the parent kills it at a random moment after its first
complete write, then tries to load every ``.ckpt`` left.

    PYTHONPATH=. python bench/kill_during_save.py --kills 20 --megabytes 64
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from azgpt.train.resume import AtomicCheckpointIO, load_checkpoint_file
from azgpt.errors import AzGPTError


def write_forever(writer_name: str, checkpoint: dict, folder: str, tmpdir: str, ready) -> None:
    os.environ["TMPDIR"] = tmpdir
    tempfile.tempdir = None
    torch.set_num_threads(1)
    writer = AtomicCheckpointIO() if writer_name == "azgpt" else TorchCheckpointIO()
    n = 0
    while True:
        writer.save_checkpoint(checkpoint, os.path.join(folder, "last.ckpt"))
        writer.save_checkpoint(checkpoint, os.path.join(folder, f"step-{n % 3}.ckpt"))
        if n == 0:
            ready.send(True)
        n += 1


def other_filesystem(path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != path.stat().st_dev:
        return shm
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="kill points per writer and TMPDIR placement")
    parser.add_argument("--megabytes", type=int, default=64, help="size of the checkpoint written")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="azgpt-kill-", dir=Path.cwd()))
    checkpoint = {"state_dict": {"w": torch.randn(args.megabytes * 2**20 // 4)}, "global_step": 7}
    placements = {"same fs": work / "tmp"}
    placements["same fs"].mkdir()
    if (shm := other_filesystem(work)) is not None:
        placements["other fs"] = Path(tempfile.mkdtemp(prefix="azgpt-kill-", dir=shm))
    context = multiprocessing.get_context("fork")
    rng = random.Random(args.seed)
    print(f"{'writer':<10} {'TMPDIR':<9} {'kills':>5} {'broken .ckpt left':>18} {'last.ckpt lost':>15}")
    try:
        for writer in ("lightning", "azgpt"):
            for placement, tmpdir in placements.items():
                broken = lost = 0
                for i in range(args.kills):
                    folder = work / f"{writer}-{placement.replace(' ', '')}-{i}"
                    folder.mkdir()
                    receive, send = context.Pipe(duplex=False)
                    child = context.Process(target=write_forever, args=(writer, checkpoint, str(folder),
                                                                        str(tmpdir), send))
                    child.start()
                    receive.poll(600)
                    time.sleep(rng.uniform(0.0, 0.5))
                    os.kill(child.pid, signal.SIGKILL)
                    child.join()
                    for path in folder.glob("*.ckpt"):
                        try:
                            load_checkpoint_file(path, mmap=True)
                        except AzGPTError:
                            broken += 1
                    try:
                        load_checkpoint_file(folder / "last.ckpt", mmap=True)
                    except AzGPTError:
                        lost += 1
                    shutil.rmtree(folder)
                print(f"{writer:<10} {placement:<9} {args.kills:>5} {broken:>18} {lost:>15}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tmpdir in placements.values():
            shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"checkpoint {args.megabytes} MB; reproduce: PYTHONPATH=. python bench/kill_during_save.py "
          f"--kills {args.kills} --megabytes {args.megabytes} --seed {args.seed}")


if __name__ == "__main__":
    main()
