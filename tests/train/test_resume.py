"""Trusting a run: exact resume, checkpoints that survive kill -9, SIGTERM / SIGINT, the NaN guard, safe loading.

Tiny model (1 layer, n_embd 32, block 32, vocab 300), accumulation 4, dropout 0.1, 6 optimizer steps. Every
resumed run is compared bitwise with one uninterrupted reference run.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from azgpt.train.resume import AtomicCheckpointIO, NonFiniteWeightsError, load_checkpoint_file
from azgpt.cli import main
from azgpt.data.prepare import PrepareConfig, prepare
from process_env import child_env
from resume_helpers import MAX_STEPS, read_final, read_losses, write_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareConfig(out=out, vocab_size=300, block_size=32, val_fraction=0.1))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted run of MAX_STEPS optimizer steps."""
    run = tmp_path_factory.mktemp("reference")
    assert fit(write_config(run, data_dir)) == 0
    assert sorted(read_losses(run)) == list(range(1, MAX_STEPS + 1))
    return run


def fit(config: Path, *args: str) -> int:
    return main(["fit", "--config", str(config), *args])


def signal_callback(name: str, step: int, micro: int) -> list[dict]:
    return [{"class_path": "resume_helpers.SelfSignal", "init_args": {"signal": name, "step": step, "micro": micro}}]


def checkpoints(run: Path) -> list[Path]:
    return sorted(run.glob("lightning_logs/*/checkpoints/*.ckpt"))


def assert_matches_reference(reference: Path, runs: list[Path]) -> float:
    """Every step any of ``runs`` recorded equals the reference's, bitwise; so do the final weights and
    optimizer state of the last run. Returns max |delta loss| (0.0 when all is well)."""
    expected = read_losses(reference)
    seen: dict[int, torch.Tensor] = {}
    for run in runs:
        seen.update(read_losses(run))
    assert sorted(seen) == sorted(expected), "the runs together must cover every optimizer step exactly"
    delta = max(abs(float(seen[s]) - float(expected[s])) for s in expected)
    for step in expected:
        assert torch.equal(seen[step], expected[step]), f"loss of step {step} differs after resume"
    final, want = read_final(runs[-1]), read_final(reference)
    assert final["global_step"] == want["global_step"] == MAX_STEPS
    for name, value in want["model"].items():
        assert torch.equal(final["model"][name], value), f"weight {name} differs after resume"
    for key, value in want["optimizer"]["state"].items():
        for field, tensor in value.items():
            assert torch.equal(final["optimizer"]["state"][key][field], tensor), f"optimizer {key}.{field} differs"
    return delta


# --------------------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_stop_mid_epoch_and_resume_is_bitwise_identical(tmp_path, data_dir, reference, capsys) -> None:
    """Done-when 1: stopped after step 3 (signal mid-accumulation), resumed with --ckpt_path last to step 6."""
    run = tmp_path / "run"
    assert fit(write_config(run, data_dir, extra_callbacks=signal_callback("SIGTERM", 3, 1))) == 143
    assert "stopped by SIGTERM after optimizer step 3" in capsys.readouterr().err
    assert load_checkpoint_file(run / "lightning_logs/version_0/checkpoints/last.ckpt")["global_step"] == 3
    assert sorted(read_losses(run)) == [1, 2, 3]
    assert fit(write_config(run, data_dir), "--ckpt_path", "last") == 0
    assert sorted(read_losses(run)) == [1, 2, 3, 4, 5, 6]
    delta = assert_matches_reference(reference, [run])
    print(f"max |delta loss| one interruption: {delta}")
    # TensorBoard's curves have no gap: the stopped run logged the step it saved (Lightning's step 2 = step 3).
    from azgpt.train.history import read_history

    stopped, resumed = (read_history(run / "lightning_logs" / v) for v in ("version_0", "version_1"))
    assert [p.step for p in stopped.curve("train_loss")] == [0, 1, 2]
    assert [p.step for p in resumed.curve("train_loss")] == [3, 4, 5]
    assert [p.step for p in stopped.curve("grad_norm")] == [0, 1, 2]


@pytest.mark.slow
def test_bf16_mixed_on_cpu_resumes_bitwise_identical(tmp_path, data_dir, reference, capsys) -> None:
    """bf16-mixed, what 16-mixed becomes on CPUs with native bf16 matmuls, resumes exactly too."""
    bf16 = ("--trainer.precision", "bf16-mixed")
    uninterrupted, run = tmp_path / "uninterrupted", tmp_path / "run"
    assert fit(write_config(uninterrupted, data_dir), *bf16) == 0
    assert fit(write_config(run, data_dir, extra_callbacks=signal_callback("SIGTERM", 3, 1)), *bf16) == 143
    assert fit(write_config(run, data_dir), *bf16, "--ckpt_path", "last") == 0
    assert_matches_reference(uninterrupted, [run])
    # bf16 really ran: its losses are close to fp32's but not the same numbers.
    fp32, half = read_losses(reference), read_losses(uninterrupted)
    assert any(not torch.equal(fp32[s], half[s]) for s in fp32)
    assert max(abs(float(fp32[s]) - float(half[s])) for s in fp32) < 0.05


@pytest.mark.slow
def test_two_interruptions_sigterm_then_sigint_in_real_processes(tmp_path, data_dir, reference) -> None:
    """Done-when 2 and 5: SIGTERM (exit 143), then SIGINT (exit 130), each mid-accumulation, in real processes;
    each leaves a checkpoint at a step boundary, and the final resume ends at exactly max_steps with the
    uninterrupted run's losses, weights and optimizer state (dropout 0.1)."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "azgpt.cli", "fit", "--config"]
    env = child_env()

    first = subprocess.run([*command, str(write_config(run, data_dir, extra_callbacks=signal_callback(
        "SIGTERM", 2, 2)))], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 143, first.stderr[-3000:]
    assert "stopped by SIGTERM after optimizer step 2" in first.stderr
    assert load_checkpoint_file(run / "lightning_logs/version_0/checkpoints/last.ckpt")["global_step"] == 2

    second = subprocess.run([*command, str(write_config(run, data_dir, extra_callbacks=signal_callback(
        "SIGINT", 4, 1))), "--ckpt_path", "last"], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert second.returncode == 130, second.stderr[-3000:]
    assert "stopped by SIGINT after optimizer step 4" in second.stderr
    assert load_checkpoint_file(run / "lightning_logs/version_1/checkpoints/last.ckpt")["global_step"] == 4

    assert fit(write_config(run, data_dir), "--ckpt_path", "last") == 0
    delta = assert_matches_reference(reference, [run])
    print(f"max |delta loss| two interruptions: {delta}")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    import random as python_random

    import numpy as np

    from azgpt.train.resume import atomic_torch_save, capture_rng_state, restore_rng_state

    torch.manual_seed(1)
    state = capture_rng_state()
    atomic_torch_save({"rng": state}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), python_random.random())
    torch.manual_seed(2), np.random.seed(2), python_random.seed(2)
    restore_rng_state(load_checkpoint_file(tmp_path / "rng.ckpt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert python_random.random() == expected[2]


def test_graceful_stop_takes_sigterm_and_sigint_only_and_gives_them_back() -> None:
    """SIGUSR1 (SLURM's requeue signal) stays Lightning's; a second Ctrl-C stops at once."""
    from types import SimpleNamespace

    from azgpt.train.signals import GracefulStop

    def usr1_handler(signum, frame):
        return None

    previous_usr1 = signal.signal(signal.SIGUSR1, usr1_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop, trainer = GracefulStop(), SimpleNamespace(received_sigterm=False)
    try:
        stop.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) is usr1_handler
        os.kill(os.getpid(), signal.SIGTERM)  # only raises a flag now
        time.sleep(0.01)
        assert stop._received == signal.SIGTERM
        stop._received = None
        stop._handle(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.teardown(trainer, None, "fit")
        signal.signal(signal.SIGUSR1, previous_usr1)
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


# --------------------------------------------------------------------------- checkpoints that survive kill -9


def _save_forever(ckpt: dict, folder: str, tmpdir: str, ready) -> None:
    """Child: write last.ckpt and step-N.ckpt over and over, as a training run does."""
    os.environ["TMPDIR"] = tmpdir
    import tempfile

    tempfile.tempdir = None
    torch.set_num_threads(1)
    io = AtomicCheckpointIO()
    n = 0
    while True:
        io.save_checkpoint(ckpt, os.path.join(folder, "last.ckpt"))
        io.save_checkpoint(ckpt, os.path.join(folder, f"step-{n % 3}.ckpt"))
        if n == 0:
            ready.send(True)
        n += 1


def _other_filesystem(path: Path) -> Path | None:
    for candidate in (Path("/dev/shm"), Path("/run"), Path("/var/tmp")):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and candidate.stat().st_dev != path.stat().st_dev:
            return candidate
    return None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_9_while_writing_checkpoints_never_leaves_a_broken_ckpt(tmp_path, reference) -> None:
    """Done-when 3 (writer): SIGKILL at random moments of a loop of checkpoint writes, TMPDIR on the same and
    on another filesystem: every .ckpt left loads, and last.ckpt is never lost."""
    ckpt = load_checkpoint_file(checkpoints(reference)[-1])
    tmpdirs = {"same filesystem": tmp_path / "tmp"}
    tmpdirs["same filesystem"].mkdir()
    other = _other_filesystem(tmp_path)
    if other is not None:
        tmpdirs["other filesystem"] = other
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    kills = lost = mid_write = 0
    for label, tmpdir in tmpdirs.items():
        folder = tmp_path / label.replace(" ", "_")
        folder.mkdir()
        for _ in range(6):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_save_forever, args=(ckpt, str(folder), str(tmpdir), send))
            child.start()
            assert receive.poll(120), "the writer never finished its first checkpoint"
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            kills += 1
            leftovers = list(folder.glob(".*.tmp"))
            mid_write += bool(leftovers)
            for leftover in leftovers:
                leftover.unlink()
            for path in folder.glob("*.ckpt"):
                assert load_checkpoint_file(path)["global_step"] == ckpt["global_step"], path
            lost += not (folder / "last.ckpt").is_file()
    print(f"kill -9 points: {kills} ({mid_write} mid-write), checkpoints lost: {lost}, "
          f"filesystems: {', '.join(tmpdirs)}")
    assert lost == 0
    assert mid_write > 0, "no kill landed during a write: the test proved nothing about half-written files"


@pytest.mark.slow
def test_kill_9_of_a_training_run_then_resume(tmp_path, data_dir, reference) -> None:
    """Done-when 3 (training): kill -9 a run that checkpoints every step, at a random moment after step 3
    (it cannot pass step 5); every .ckpt left loads, and --ckpt_path last resumes it to the reference's end,
    bitwise."""
    run = tmp_path / "run"
    stall = [{"class_path": "resume_helpers.Stall", "init_args": {"step": 5}}]
    env = child_env()
    env["TMPDIR"] = str(_other_filesystem(tmp_path) or tmp_path)
    config = write_config(run, data_dir, every_step_checkpoint=True, extra_callbacks=stall)
    child = subprocess.Popen([sys.executable, "-m", "azgpt.cli", "fit", "--config", str(config)], env=env,
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run / "lightning_logs/version_0/checkpoints/every-step=3.ckpt").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the run ended before checkpointing"
            time.sleep(0.01)
        time.sleep(random.Random(1).uniform(0.0, 0.3))
    finally:
        child.kill()
        child.wait()
    left = checkpoints(run)
    for path in left:
        load_checkpoint_file(path)
    assert fit(write_config(run, data_dir, every_step_checkpoint=True), "--ckpt_path", "last") == 0
    assert_matches_reference(reference, [run])


# --------------------------------------------------------------------------- --ckpt_path last fallbacks


@pytest.mark.slow
def test_truncated_last_falls_back_to_newest_readable_checkpoint(tmp_path, data_dir, reference, capsys) -> None:
    """Done-when 4: a truncated last.ckpt: warned about, by name, and the newest readable one is used."""
    run = tmp_path / "run"
    config = write_config(run, data_dir)
    shutil.copytree(reference / "lightning_logs", run / "lightning_logs")
    folder = run / "lightning_logs/version_0/checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    best = folder / f"best-step={MAX_STEPS}.ckpt"
    with pytest.warns(UserWarning, match="last.ckpt is unreadable.*best-step=6.ckpt"):
        assert fit(config, "--ckpt_path", "last", "--trainer.max_steps", str(MAX_STEPS + 1)) == 0
    assert best.is_file()
    assert sorted(read_losses(run)) == [MAX_STEPS + 1], "resumed at step 6, not from 0"


def test_ckpt_path_last_without_any_readable_checkpoint_fails_clearly(tmp_path, data_dir, capsys) -> None:
    run = tmp_path / "run"
    config = write_config(run, data_dir)
    assert fit(config, "--ckpt_path", "last") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    folder = run / "lightning_logs/version_0/checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    assert fit(config, "--ckpt_path", "last") == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "last.ckpt" in err
    assert not read_losses(run), "nothing may train from step 0"


def test_missing_or_truncated_explicit_checkpoint_is_a_clear_error(tmp_path, data_dir, capsys) -> None:
    config = write_config(tmp_path / "run", data_dir)
    assert fit(config, "--ckpt_path", str(tmp_path / "nope.ckpt")) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    (tmp_path / "cut.ckpt").write_bytes(b"\x00" * 100)
    assert main(["validate", "--config", str(config), "--ckpt_path", str(tmp_path / "cut.ckpt")]) == 2
    assert "cut.ckpt is not a readable checkpoint" in capsys.readouterr().err


def test_atomic_write_goes_through_a_temporary_file_beside_the_target(tmp_path, monkeypatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((str(src), str(dst))), real_replace(src, dst)))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    target = tmp_path / "ckpts" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, target)
    assert len(renames) == 1 and Path(renames[0][0]).parent == target.parent and renames[0][1] == str(target)
    assert not Path(renames[0][0]).name.endswith(".ckpt")
    assert os.listdir(target.parent) == ["last.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 1


# --------------------------------------------------------------------------- NaN guard


@pytest.mark.slow
@pytest.mark.parametrize("what", ["grad", "loss"])
def test_non_finite_step_stops_before_touching_the_weights(tmp_path, data_dir, capsys, what) -> None:
    """Done-when 6: NaN gradients (or an infinite loss) at step 3: exit 3 naming step 3; checkpoints finite."""
    run = tmp_path / "run"
    poison = [{"class_path": "resume_helpers.Poison", "init_args": {"step": 3, "what": what}}]
    config = write_config(run, data_dir, every_step_checkpoint=True, extra_callbacks=poison)
    assert fit(config) == 3
    err = capsys.readouterr().err
    assert f"non-finite {'loss' if what == 'loss' else 'gradient norm'} at optimizer step 3" in err
    last = load_checkpoint_file(run / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert last["global_step"] == 2
    for path in checkpoints(run):
        for name, value in load_checkpoint_file(path)["state_dict"].items():
            assert torch.isfinite(value).all(), f"{path.name}: {name}"


def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    with pytest.raises(NonFiniteWeightsError, match="model.w"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("nan")])}}, target)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this creates ``sentinel``: proof that code in a checkpoint ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path, data_dir, reference, capsys) -> None:
    """Done-when 7: fit --ckpt_path, validate --ckpt_path and --ckpt_path last refuse it with exit 2."""
    sentinel = tmp_path / "payload-ran"
    genuine = load_checkpoint_file(checkpoints(reference)[-1])
    evil = tmp_path / "evil.ckpt"
    torch.save({**genuine, "extra": _Payload(sentinel)}, evil)
    config = write_config(tmp_path / "run", data_dir)
    for command in ("fit", "validate", "test"):
        assert main([command, "--config", str(config), "--ckpt_path", str(evil)]) == 2, command
        assert "refusing to load" in capsys.readouterr().err
    folder = tmp_path / "run/lightning_logs/version_0/checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(evil, folder / "last.ckpt")
    assert fit(config, "--ckpt_path", "last") == 2
    assert "refusing to load" in capsys.readouterr().err
    from azgpt.train.module import AzGPT

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        AzGPT.load_from_checkpoint(evil)
    assert not sentinel.exists(), "the payload ran"
    assert main(["fit", "--config", str(config), "--weights_only", "false"]) == 2


def test_checkpoints_load_with_weights_only(reference) -> None:
    from azgpt.train.module import AzGPT

    path = checkpoints(reference)[-1]
    model = AzGPT.load_from_checkpoint(path, weights_only=True)
    assert model.tokenizer_json and model.hparams.n_embd == 32


def test_no_weights_only_false_in_the_package() -> None:
    package = Path(__file__).resolve().parents[2] / "azgpt"
    offenders = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not offenders
