"""Hostile cases for export and generate: a folder is a whole export or nothing, every failure one clear line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from azgpt.cli import main
from azgpt.use.export import EXPORTED_FILES
from mount_helpers import tmpfs


def refused(capsys: pytest.CaptureFixture[str], verb: str, *args: object) -> str:
    code = main([verb, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("azgpt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_every_exported_file_gets_the_same_mode(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out)]) == 0
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in EXPORTED_FILES}
    assert len(set(modes.values())) == 1, modes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it


def test_export_that_fails_midway_leaves_no_folder(tiny_run, tmp_path: Path, monkeypatch, capsys) -> None:
    from azgpt.use import export

    def broken(content):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_json_bytes", broken)
    err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", tmp_path / "hf")
    assert "the disk is full" in err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_export_leaves_nothing_that_looks_like_a_model(tiny_run, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "small", size="40k") as small:
        err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", small / "hf")
        assert f"--out {small / 'hf'}" in err and "the disk is full" in err
        assert list(small.iterdir()) == []


def test_read_only_export_folder_is_one_clear_line(tiny_run, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        err = refused(capsys, "export", "--ckpt", tiny_run.ckpt, "--out", ro / "hf")
        assert "read-only" in err


def test_overwrite_replaces_an_export_and_keeps_foreign_files(tiny_run, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out)]) == 0
    (out / "config.json").write_text("stale")
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").read_text() != "stale"
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {*EXPORTED_FILES, "notes.txt"}


# -- generate ---------------------------------------------------------------------------------------------


def generate(capsys, ckpt: Path, *args: object) -> tuple[int, str, str]:
    code = main(["generate", "--ckpt", str(ckpt), "--max_new_tokens", "12", "--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def crafted(tiny_run, tmp_path: Path, change) -> Path:
    """A copy of the tiny run's checkpoint with ``change(checkpoint)`` applied."""
    import torch

    checkpoint = torch.load(tiny_run.ckpt, map_location="cpu", weights_only=True)
    change(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_prompt_of_invalid_utf8_is_one_clear_line(tiny_run, capsys) -> None:
    prompt = b"Bak\xc4 \xff".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, _, err = generate(capsys, tiny_run.ckpt, "--prompt", prompt)
    assert code == 2 and err.startswith("azgpt: error: the prompt is not valid UTF-8") and "Traceback" not in err


def test_a_vanishing_temperature_samples_the_likeliest_token(tiny_run, capsys) -> None:
    code, greedy, err = generate(capsys, tiny_run.ckpt, "--prompt", "Azərbaycan", "--temperature", "0")
    assert code == 0, err
    for tiny in ("1e-45", "5e-324", "1e-30"):
        code, out, err = generate(capsys, tiny_run.ckpt, "--prompt", "Azərbaycan", "--temperature", tiny,
                                  "--seed", "1")
        assert code == 0, err
        assert out == greedy


@pytest.mark.parametrize("seed", [str(2**64), str(2**70), "-1"])
def test_a_seed_beyond_64_bits_is_one_clear_line(seed: str, tiny_run, capsys) -> None:
    code, _, err = generate(capsys, tiny_run.ckpt, "--prompt", "Bakı", "--seed", seed)
    assert code == 2 and "seed must be an integer from 0 to" in err and "Traceback" not in err


def test_the_largest_seed_works(tiny_run, capsys) -> None:
    assert generate(capsys, tiny_run.ckpt, "--prompt", "Bakı", "--seed", str(2**64 - 1))[0] == 0


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_a_checkpoint_with_nan_weights_is_refused_when_greedy_and_sampling(temperature: str, tiny_run,
                                                                           tmp_path: Path, capsys) -> None:
    def poison(checkpoint):
        checkpoint["state_dict"]["model.transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")

    code, out, err = generate(capsys, crafted(tiny_run, tmp_path, poison), "--prompt", "Bakı", "--temperature",
                              temperature)
    assert code == 2 and out == ""
    assert "hold NaN or infinite values" in err and "transformer.h.0.mlp.c_fc.weight" in err


def peak_rss_of_generate(ckpt: Path) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS in bytes of ``azgpt generate`` on ``ckpt`` in a process of its own."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "azgpt.cli", "generate", "--ckpt", str(ckpt), "--prompt", "Bakı",
               "--max_new_tokens", "2", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = process.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), err, usage.ru_maxrss * 1024  # KiB on Linux


@pytest.mark.slow
def test_a_crafted_block_size_allocates_nothing_and_is_refused(tiny_run, tmp_path: Path) -> None:
    def huge(checkpoint):
        # 2**22 positions x n_embd 32 in fp32: a 512 MiB position table if the model were built to check it.
        checkpoint["hyper_parameters"]["block_size"] = 2**22

    code, err, peak = peak_rss_of_generate(crafted(tiny_run, tmp_path, huge))
    assert code == 2 and "do not fit the architecture" in err and "transformer.wpe.weight" in err
    plain_code, plain_err, plain_peak = peak_rss_of_generate(tiny_run.ckpt)
    assert plain_code == 0, plain_err
    assert peak < plain_peak + 64 * 2**20, f"refusing took {(peak - plain_peak) / 2**20:.0f} MiB more than generating"


# -- a checkpoint carrying code -----------------------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this should never run",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_pickle_payload_is_refused_saying_only_that_it_holds_code(container: str, tmp_path: Path, capsys,
                                                                    prepared_dir: Path) -> None:
    import pickle

    import torch

    path = tmp_path / "evil.ckpt"
    content = {"state_dict": {}, "global_step": 1, "hyper_parameters": RunsCode()}
    if container == "torch-zip":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    for command in (["generate", "--ckpt", path, "--prompt", "Bakı"], ["export", "--ckpt", path, "--out",
                                                                        tmp_path / "hf"],
                    ["validate", "--config", "quickstart.yaml", "--data.data_dir", prepared_dir, "--ckpt_path", path]):
        code = main([str(a) for a in command])
        err = capsys.readouterr().err
        assert code == 2, err
        line = err.strip().splitlines()[-1]
        assert line == f"azgpt: error: refusing to load {path}: the file holds code (posix.system) that azgpt will " \
                       f"not run; use a checkpoint written by azgpt fit"
        assert "weights_only" not in err and "False" not in err and "trusted" not in err
