"""Hostile cases around fit / validate: nothing lost at the end of a run, nothing mixed up between runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from azgpt.errors import AzGPTError
from conftest import tiny_fit_args

TESTS_DIR = Path(__file__).resolve().parents[1]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_last_ckpt_holds_the_final_step_and_resuming_retrains_nothing(prepared_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    code, _ = run(tiny_fit_args(prepared_dir, max_steps=7), capsys)  # validates at 3 and 6, ends at 7
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert code == 0 and step_of(last) == 7
    steps = tmp_path / "steps.txt"
    code, _ = run(tiny_fit_args(prepared_dir, max_steps=9) + [
        "--ckpt_path", "last", "--trainer.callbacks+=resume_helpers.LossRecorder",
        f"--trainer.callbacks.path={steps}"], capsys)
    assert code == 0
    assert [int(line.split()[0]) for line in steps.read_text().splitlines()] == [8, 9]
    assert step_of(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt") == 9


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample corpus prepared with another (smaller) tokenizer than ``prepared_dir``'s."""
    from azgpt.data.prepare import PrepareConfig, prepare
    from conftest import TINY_BLOCK

    out = tmp_path_factory.mktemp("other") / "data"
    prepare(PrepareConfig(out=out, vocab_size=400, block_size=TINY_BLOCK, val_fraction=0.1))
    return out


@pytest.mark.parametrize("verb", ["validate", "fit"])
def test_a_checkpoint_refuses_data_of_another_tokenizer_naming_both(verb: str, trained_run: Path,
                                                                     other_tokenizer_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from azgpt.checkpoint import load_checkpoint
    from azgpt.data.tokenizer import load_tokenizer, tokenizer_sha256

    monkeypatch.chdir(tmp_path)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = tiny_fit_args(other_tokenizer_dir, max_steps=9)
    args[0] = verb
    if verb == "validate":
        args = [a for a in args if a not in ("--val_every_n_steps", "3")]
    code, err = run(args + ["--ckpt_path", str(ckpt)], capsys)
    ckpt_sha = tokenizer_sha256(load_checkpoint(ckpt).tokenizer)[:12]
    data_sha = tokenizer_sha256(load_tokenizer(other_tokenizer_dir / "tokenizer.json"))[:12]
    assert code == 2, err
    assert "another tokenizer" in err and ckpt_sha in err and data_sha in err
    assert str(ckpt) in err and str(other_tokenizer_dir) in err
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_disk_full_while_saving_a_checkpoint_is_one_clear_line(prepared_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mount_helpers import tmpfs

    with tmpfs(tmp_path / "small", size="96k") as small:
        monkeypatch.chdir(small)  # quickstart logs and checkpoints to ./lightning_logs
        code, err = run(tiny_fit_args(prepared_dir, max_steps=4), capsys)
        assert code == 2, err
        assert "azgpt: error: cannot write checkpoint" in err and "the disk is full" in err
        assert "--ckpt_path last" in err and "Traceback" not in err
        left = [p.name for p in small.rglob("*") if p.is_file()]
        assert not [name for name in left if name.endswith((".ckpt", ".tmp"))], left


def test_ckpt_path_best_is_the_best_checkpoint_the_run_recorded(trained_run: Path, prepared_dir: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from azgpt.train.resume import resolve_checkpoint

    shutil.copytree(trained_run, tmp_path / "lightning_logs" / "version_0")
    monkeypatch.chdir(tmp_path)
    folders = [Path("lightning_logs/version_0/checkpoints")]
    best = Path(resolve_checkpoint("best", folders))
    assert best.name.startswith("best-step=") and best.is_file()
    args = [a for a in tiny_fit_args(prepared_dir) if a not in ("--val_every_n_steps", "3")]
    code, err = run(["validate", *args[1:], "--ckpt_path", "best"], capsys)
    assert code == 0, err

    best.unlink()
    with pytest.raises(AzGPTError, match=r"--ckpt_path best: .* no longer exists"):
        resolve_checkpoint("best", folders)


def test_ctrl_c_twice_exits_130(prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    import signal

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    handler = signal.getsignal(signal.SIGINT)
    try:
        code, err = run(tiny_fit_args(prepared_dir) + ["--trainer.callbacks+=resume_helpers.CtrlCTwice"], capsys)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130, err
    assert "stopped at once by Ctrl-C" in err and "Traceback" not in err
    # Both presses came as optimizer step 2 began, before any validation or save: nothing may be written.
    assert list(tmp_path.rglob("*.ckpt")) == []


def test_predict_is_not_a_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "predict" not in capsys.readouterr().out
    assert main(["predict", "--config", "quickstart.yaml"]) == 2
    assert "unknown verb 'predict'" in capsys.readouterr().err
