"""A run's logged curves read back from whichever logger wrote them: TensorBoard, CSVLogger, W&B (offline) or
MLflow (a ``file:`` store).

Each backend is read with its own reader: TensorBoard's ``EventAccumulator``, Python's ``csv`` for CSVLogger's
``metrics.csv`` and W&B's own record schema (``wandb.proto``) for the ``.wandb`` file of an offline run.
"""

from __future__ import annotations

import csv
import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from azgpt.errors import AzGPTError


class Point(NamedTuple):
    step: int
    value: float
    wall_time: float | None  # seconds since the epoch, where the backend records it


@dataclass
class RunHistory:
    """Every scalar curve (tag -> points in step order) and text (tag -> (step, text)) of one run."""

    source: str  # the file(s) it was read from, for the report
    scalars: dict[str, list[Point]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    wall_seconds: float | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read and was left out

    def curve(self, tag: str) -> list[Point]:
        return self.scalars.get(tag, [])

    def add(self, tag: str, step: int, value: float, wall_time: float | None = None) -> None:
        self.scalars.setdefault(tag, []).append(Point(step, value, wall_time))

    def finish(self) -> RunHistory:
        for points in self.scalars.values():
            points.sort(key=lambda p: p.step)
        times = [p.wall_time for points in self.scalars.values() for p in points if p.wall_time is not None]
        if self.wall_seconds is None and times:
            self.wall_seconds = max(times) - min(times)
        return self


def read_history(run_dir: str | Path) -> RunHistory:
    """The curves of the run in ``run_dir`` (a TensorBoard or CSVLogger version folder, the checkpoint folder's
    parent of a W&B run, or a W&B offline run folder); ``AzGPTError`` if it holds no run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AzGPTError(f"{run_dir} is not a folder: pass a run folder such as lightning_logs/version_0")
    if any(run_dir.glob("events.out.tfevents.*")):
        return _read_tensorboard(run_dir)
    if (run_dir / "metrics.csv").is_file():
        return _read_csv(run_dir)
    wandb_file = _find_wandb_file(run_dir)
    if wandb_file is not None:
        return _read_wandb(wandb_file)
    if (run_dir / "meta.yaml").is_file() and (run_dir / "metrics").is_dir():
        return _read_mlflow(run_dir)
    raise AzGPTError(f"{run_dir} holds no run: no TensorBoard events.out.tfevents.* file, no CSVLogger "
                     f"metrics.csv, no W&B .wandb file and no MLflow run; pass a run folder such as "
                     f"lightning_logs/version_0")


def _read_mlflow(run_dir: Path) -> RunHistory:
    """A run of MLflow's ``file:`` store (``<store>/<experiment id>/<run id>``, where Lightning also files its
    checkpoints), read with MLflow's own client: metrics with their steps and times, texts from the artifacts
    ``log_text`` writes."""
    from azgpt.train.loggers import MLFLOW_TEXT, mlflow_client, mlflow_file_store

    run_id = run_dir.name
    history = RunHistory(source=f"MLflow run {run_id} in {run_dir.parents[1]}")
    with mlflow_file_store():
        client = mlflow_client(f"file:{run_dir.parents[1].resolve()}")
        run = client.get_run(run_id)
        for key in run.data.metrics:
            for metric in client.get_metric_history(run_id, key):
                history.add(key, metric.step, metric.value, metric.timestamp / 1000)
        pending = [MLFLOW_TEXT]
        while pending:
            for item in client.list_artifacts(run_id, pending.pop()):
                if item.is_dir:
                    pending.append(item.path)
                    continue
                tag, _, name = item.path.removeprefix(f"{MLFLOW_TEXT}/").rpartition("/")
                text = Path(client.download_artifacts(run_id, item.path)).read_text(encoding="utf-8")
                history.texts.setdefault(tag, []).append((int(name.removesuffix(".md")), text))
    for texts in history.texts.values():
        texts.sort()
    return history.finish()


def _read_tensorboard(run_dir: Path) -> RunHistory:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    history = RunHistory(source=f"TensorBoard events in {run_dir}")
    tags = events.Tags()
    for tag in tags["scalars"]:
        for event in events.Scalars(tag):
            history.add(tag, event.step, event.value, event.wall_time)
    for tag in tags["tensors"]:
        if tag.endswith("/text_summary"):
            history.texts[tag.removesuffix("/text_summary")] = [
                (e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in events.Tensors(tag)]
    return history.finish()


def _read_csv(run_dir: Path) -> RunHistory:
    path = run_dir / "metrics.csv"
    history = RunHistory(source=f"CSVLogger's {path}")
    skipped = 0
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = csv.DictReader(f)
        if "step" not in (rows.fieldnames or []):
            raise AzGPTError(f"{path} has no step column, so it is not a CSVLogger metrics.csv: pass the folder of "
                             f"a run written by lightning.pytorch.loggers.CSVLogger")
        for row in rows:
            step = _number(row.pop("step"))
            if step is None or not math.isfinite(step):
                skipped += 1
                continue
            for tag, value in row.items():
                if value in ("", None) or tag in ("epoch", None):
                    continue
                number = _number(value)
                if number is None:
                    skipped += 1
                else:
                    history.add(tag, int(step), number)
    if skipped:
        history.notes.append(f"{path}: left out {skipped} values that are not numbers")
    text_file = run_dir / "text.csv"
    if text_file.is_file():
        with text_file.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = _number(row.get("step"))
                if step is not None and math.isfinite(step) and row.get("tag") is not None:
                    history.texts.setdefault(row["tag"], []).append((int(step), row.get("text") or ""))
    # CSVLogger keeps no clock: from the config LightningCLI writes at the start to the last metrics written.
    started = [p.stat().st_mtime for p in (run_dir / "config.yaml", run_dir / "hparams.yaml") if p.is_file()]
    if started:
        history.wall_seconds = (run_dir / "metrics.csv").stat().st_mtime - min(started)
    return history.finish()


def _number(text: object) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _find_wandb_file(run_dir: Path) -> Path | None:
    """The ``run-<id>.wandb`` of a W&B run: in ``run_dir`` itself, or, for the folder Lightning files its
    checkpoints in (``<save_dir>/<project>/<id>``), in ``<save_dir>/wandb/*-<id>/``."""
    found = sorted(run_dir.glob("run-*.wandb"))
    if not found and len(run_dir.parents) >= 2:
        found = sorted(run_dir.parents[1].glob(f"wandb/*-{run_dir.name}/run-{run_dir.name}.wandb"))
    return found[-1] if found else None


def wait_for_wandb_file(run_dir: Path, timeout: float = 15.0, poll: float = 0.5) -> bool:
    """Wait until the W&B run file of ``run_dir`` holds history records and stops growing; False at ``timeout``.

    W&B's core writes the file in another process, which may still be flushing when ``finish()`` returns: a report
    read at once sometimes found no logged values yet.
    """
    deadline = time.monotonic() + timeout
    previous = -1
    while True:
        path = _find_wandb_file(run_dir)
        size = path.stat().st_size if path is not None and path.is_file() else -1
        if size >= 0 and size == previous and any(r.HasField("history") for r in wandb_records(path)):
            return True
        if time.monotonic() >= deadline:
            return False
        previous = size
        time.sleep(poll)


# W&B writes its records in LevelDB's log format (32 KiB blocks of CRC-framed chunks) after a 7-byte header;
# wandb >= 0.19 reads it only in its Go core, so the framing is undone here and each record parsed with
# wandb's own protobuf schema.
_BLOCK = 32768
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32c, length, type (1 full, 2 first, 3 middle, 4 last)
_FILE_HEADER = b":W&B"


def wandb_records(path: Path) -> list:
    """Every complete record of a ``.wandb`` file, as ``wandb.proto.wandb_internal_pb2.Record`` messages (a file
    cut mid-record, by a run still writing or a kill, is read up to its last complete record)."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        raise AzGPTError(f"{path} is a Weights & Biases run: pip install 'azgpt[wandb]' to read it") from None
    data = path.read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise AzGPTError(f"{path} is not a W&B run file (it does not start with {_FILE_HEADER!r})")
    records, pieces, pos = [], [], 7
    while pos + _CHUNK_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        pos += _CHUNK_HEADER.size
        if kind == 0:  # zero padding up to the end of the block
            pos += left - _CHUNK_HEADER.size
            continue
        if pos + length > len(data):
            break  # the file ends inside this chunk
        pieces.append(data[pos:pos + length])
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(b"".join(pieces))
            except DecodeError:
                break  # a record the writer had not finished
            records.append(record)
            pieces = []
    return records


def _read_wandb(path: Path) -> RunHistory:
    history = RunHistory(source=f"W&B run file {path}")
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
        step = row.pop("trainer/global_step", None)
        wall_time = row.get("_timestamp")
        if step is None:
            continue
        # A table (what log_text writes) arrives flattened: <tag>/_type, <tag>/path, <tag>/nrows, ...
        tables = [k.removesuffix("/_type") for k, v in row.items() if k.endswith("/_type") and v == "table-file"]
        for tag in tables:
            history.texts.setdefault(tag, []).append((int(step), _wandb_table_text(path, row.get(f"{tag}/path"))))
        for tag, value in row.items():
            if tag.startswith("_") or tag == "epoch" or any(tag.startswith(f"{t}/") for t in tables):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                history.add(tag, int(step), float(value), wall_time)
    return history.finish()


def _wandb_table_text(run_file: Path, relative: str | None) -> str:
    """The text column of a table ``log_text`` wrote (stored beside the run file under files/)."""
    table = run_file.parent / "files" / (relative or "")
    try:
        content = json.loads(table.read_text(encoding="utf-8"))
        return "\n".join(str(row[-1]) for row in content.get("data", []))
    except (OSError, ValueError):
        return ""


def finite(points: list[Point]) -> list[Point]:
    return [p for p in points if math.isfinite(p.value)]
