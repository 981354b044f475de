"""Stop and resume: checkpoints that survive a kill, load only tensors and plain values, and resume exactly.

- ``AtomicCheckpointIO``: Lightning's checkpoint plugin, writing each file under a temporary name in the
  target folder, fsyncing it, then renaming it, so a ``.ckpt`` is either complete or absent.
- ``inspect_checkpoint`` / ``resolve_checkpoint``: what ``--ckpt_path`` (a path or ``last``) names, checked
  before anything is loaded; ``last`` falls back to the newest readable checkpoint, never to step 0.
- ``capture_rng_state`` / ``restore_rng_state``: the random-number state a checkpoint carries, so dropout
  after a resume is the dropout of an uninterrupted run.
- ``SaveLastAtEnd``: a fit that ends leaves ``last.ckpt`` at its final step.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from azgpt.atomic import create_exclusive, fsync_folder, write_error
from azgpt.checkpoint import UnsafeCheckpointError, load_checkpoint_file, non_finite_weights
from azgpt.train.lightning_private import save_last_now
from azgpt.errors import AzGPTError

CHECKPOINT_SUFFIX = ".ckpt"
LAST_NAME = re.compile(r"^last(-v?\d+)?\.ckpt$")  # Lightning's last.ckpt, last-v1.ckpt, ...
TEMPORARY_SUFFIX = ".tmp"


class NonFiniteWeightsError(AzGPTError):
    """A checkpoint about to be written holds NaN or infinite weights."""

    exit_code = 3


# -- writing ------------------------------------------------------------------------------------------


def _temporary_path(path: Path) -> Path:
    # Hidden, in the same folder (so the rename never crosses filesystems), not ending in .ckpt.
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{TEMPORARY_SUFFIX}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flush and fsync it, then rename it to ``path``."""
    path = Path(path)
    temporary = _temporary_path(path)
    writer: _RecordingWriter | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with create_exclusive(temporary, replace_leftover=True) as f:
            writer = _RecordingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError without the OSError behind it; the writer kept it.
        cause = exc if isinstance(exc, OSError) else writer.error if writer is not None else None
        error = write_error(cause, path, "checkpoint", "free some space, then resume with --ckpt_path last") \
            if cause is not None else None
        if error is None:
            raise
        raise error from None
    fsync_folder(path.parent)


class _RecordingWriter:
    """A binary file as ``torch.save`` sees it, remembering the ``OSError`` of a failed write."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable, and whose loads are ``weights_only``.

    Lightning's own writer stages the file in ``TMPDIR`` and moves it; across filesystems the move is a
    copy, and a kill during it leaves a truncated ``.ckpt``. Here the temporary file sits beside the target
    and only ``os.replace`` makes it visible. Remote paths (``s3://`` ...) keep Lightning's writer. A
    checkpoint whose weights are not finite is refused: it could only spread a diverged run.

    Use it with ``L.Trainer(plugins=[AtomicCheckpointIO()])``; ``python -m azgpt.cli`` adds it itself.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        bad = non_finite_weights(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write {path}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                f"(first: {bad[0]}); the run diverged, resume from an earlier checkpoint with a lower learning rate")
        filesystem, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(filesystem, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, local_path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is None:
            weights_only = True
        filesystem, local_path = url_to_fs(str(path))
        if not weights_only or not isinstance(filesystem, LocalFileSystem):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(local_path, map_location=map_location)


class SaveLastAtEnd(L.Callback):
    """When training ends, bring every ``ModelCheckpoint(save_last=True)``'s ``last.ckpt`` up to the final step.

    Lightning 2.6 writes ``last.ckpt`` only alongside another save (a validation, an epoch end), so a run whose
    ``max_steps`` is not a multiple of the validation interval ends with ``last.ckpt`` behind: resuming it
    would retrain the last steps. A run stopped by an exception never reaches ``on_train_end``.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                save_last_now(callback, trainer)


# -- reading and choosing -----------------------------------------------------------------------------


def inspect_checkpoint(path: str | os.PathLike) -> int:
    """Check that ``path`` loads safely and is a training checkpoint; return its ``global_step``."""
    checkpoint = load_checkpoint_file(path, mmap=True)
    if "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise AzGPTError(f"{path} is not a Lightning training checkpoint (no state_dict / global_step)")
    return int(checkpoint["global_step"])


def _newest_first(paths: Iterable[Path]) -> list[Path]:
    stamped = []
    for path in set(paths):
        try:
            stamped.append((path.stat().st_mtime_ns, str(path), path))
        except OSError:
            continue  # vanished meanwhile
    return [path for *_, path in sorted(stamped, reverse=True)]


def resolve_last_checkpoint(folders: Iterable[Path], asked: str = "last") -> Path:
    """The newest ``last*.ckpt`` in ``folders``; if it is missing or unreadable, the newest readable checkpoint.

    Falling back warns with both names. Nothing readable at all is an ``AzGPTError``: resuming must never
    quietly become a new run from step 0. ``asked`` is the ``--ckpt_path`` the messages name (``best`` reads
    the best checkpoint's name from the last one).
    """
    folders = [Path(f) for f in folders]
    where = ", ".join(str(f) for f in folders) or "(no checkpoint folder)"
    found = _newest_first(p for f in folders if f.is_dir() for p in f.glob(f"*{CHECKPOINT_SUFFIX}") if p.is_file())
    leftovers = [p for f in folders if f.is_dir() for p in f.glob(f".*{CHECKPOINT_SUFFIX}.*{TEMPORARY_SUFFIX}")]
    if leftovers:
        rank_zero_warn(f"azgpt: {len(leftovers)} unfinished checkpoint write(s) from a killed run (e.g. "
                       f"{leftovers[0]}): ignored, and safe to delete")
    if not found:
        raise AzGPTError(f"--ckpt_path {asked}: no checkpoint in {where}; drop --ckpt_path to start a new run, "
                         f"or pass the path of a .ckpt file")
    lasts = [p for p in found if LAST_NAME.match(p.name)]
    wanted = lasts[0] if lasts else None
    problems: list[str] = []
    if wanted is not None:
        try:
            inspect_checkpoint(wanted)
            return wanted
        except UnsafeCheckpointError:
            raise
        except AzGPTError as exc:
            problems.append(str(exc))
    for candidate in found:
        if candidate == wanted:
            continue
        try:
            step = inspect_checkpoint(candidate)
        except UnsafeCheckpointError:
            raise
        except AzGPTError as exc:
            problems.append(str(exc))
            continue
        missing = f"{wanted} is unreadable" if wanted is not None else f"there is no last.ckpt in {where}"
        rank_zero_warn(f"azgpt: --ckpt_path {asked}: {missing}; resuming instead from {candidate} "
                       f"(step {step}), the newest readable checkpoint")
        return candidate
    raise AzGPTError(f"--ckpt_path {asked}: no readable checkpoint in {where}: " + "; ".join(problems))


def resolve_best_checkpoint(folders: Iterable[Path]) -> Path:
    """The best checkpoint ``ModelCheckpoint`` recorded in the run's newest last checkpoint (read, never guessed)."""
    folders = list(folders)
    last = resolve_last_checkpoint(folders, asked="best")
    states = load_checkpoint_file(last, mmap=True).get("callbacks") or {}
    recorded = [state.get("best_model_path") for key, state in states.items()
                if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor")]
    recorded = [Path(p) for p in recorded if p]
    if not recorded:
        raise AzGPTError(f"--ckpt_path best: {last} records no best checkpoint (its run had no ModelCheckpoint "
                         f"monitoring a metric, or never validated): pass --ckpt_path last or a .ckpt path")
    for candidate in recorded:
        for path in (candidate, last.parent / candidate.name):  # as recorded, else beside last (a moved run)
            if path.is_file():
                inspect_checkpoint(path)
                return path
    raise AzGPTError(f"--ckpt_path best: {last} names {recorded[0]} as the best checkpoint, but it no longer "
                     f"exists: pass --ckpt_path last or a .ckpt path")


def resolve_checkpoint(ckpt_path: str, folders: Iterable[Path]) -> str:
    """What ``--ckpt_path`` means: ``last`` / ``best`` resolved in ``folders``, a file checked; Lightning's other
    keywords unchanged."""
    if ckpt_path == "last":
        return str(resolve_last_checkpoint(folders))
    if ckpt_path == "best":
        return str(resolve_best_checkpoint(folders))
    if ckpt_path in ("hpc", "registry") or "://" in ckpt_path or ckpt_path.startswith("registry:"):
        return ckpt_path  # Lightning's own keywords and remote paths
    inspect_checkpoint(ckpt_path)
    return ckpt_path


# -- random-number state ------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The global torch (CPU and current CUDA device), NumPy and Python random states, as tensors and ints.

    Stored as tensors and plain values (not NumPy arrays) so the checkpoint loads with ``weights_only=True``.
    """
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``: set every random state it holds."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))


# -- where a run's checkpoints are, from its (LightningCLI) trainer config -----------------------------


def mlflow_checkpoint_folders(args: Mapping[str, Any], root: Path) -> list[Path]:
    """Where Lightning files an ``MLFlowLogger`` run's checkpoints: ``<store>/<experiment id>/<run id>/checkpoints``
    for a ``file:`` store (``<default_root_dir>/...`` for a server); the experiment's id is asked of MLflow."""
    from azgpt.train.loggers import mlflow_client, mlflow_file_store

    uri = str(args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "")
    if not uri:
        uri = f"file:{args.get('save_dir') or './mlruns'}"  # what MLFlowLogger does without a tracking_uri
    base = Path(uri.removeprefix("file://").removeprefix("file:")) if uri.startswith("file:") else root
    name = str(args.get("experiment_name") or "lightning_logs")
    with mlflow_file_store():
        experiment = mlflow_client(uri).get_experiment_by_name(name)
    if experiment is None:
        return [base / name / "*" / "checkpoints"]  # no such experiment yet: resolve_checkpoint says none found
    return sorted((base / experiment.experiment_id).glob("*/checkpoints")) or [
        base / experiment.experiment_id / "*" / "checkpoints"]


def checkpoint_folders(trainer: Mapping[str, Any]) -> list[Path]:
    """The folders ``--ckpt_path last`` searches, read from the trainer config before anything is built.

    A ``ModelCheckpoint`` ``dirpath`` wins (as in Lightning); else every ``<save_dir>/<name>/<version>/checkpoints``
    of the first logger, since each run writes to a new version folder; else ``<default_root_dir>/checkpoints``.
    """
    root = Path(trainer.get("default_root_dir") or ".")
    callbacks = trainer.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, Mapping) else list(callbacks)
    explicit = [Path(str(cb["init_args"]["dirpath"])) for cb in callbacks
                if isinstance(cb, Mapping) and str(cb.get("class_path", "")).endswith("ModelCheckpoint")
                and (cb.get("init_args") or {}).get("dirpath")]
    if explicit:
        return explicit
    logger = trainer.get("logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else False
    if logger is False:
        return [root / "checkpoints"]
    args = (logger.get("init_args") or {}) if isinstance(logger, Mapping) else {}
    if isinstance(logger, Mapping) and str(logger.get("class_path", "")).endswith("MLFlowLogger"):
        return mlflow_checkpoint_folders(args, root)
    base = Path(str(args.get("save_dir") or args.get("root_dir") or root))
    name = args.get("name", "lightning_logs")
    if isinstance(logger, Mapping) and str(logger.get("class_path", "")).endswith("WandbLogger"):
        # W&B's "name" is the run's display name; Lightning files checkpoints under the project, then the run id.
        name = args.get("project") or os.environ.get("WANDB_PROJECT") or "lightning_logs"
    base = base / str(name) if name else base
    version = args.get("version")
    if version is not None:
        return [base / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    return sorted(base.glob("*/checkpoints")) or [base / "version_*" / "checkpoints"]
