"""Issue 23 (third round of hostile cases) for the use verbs: evaluate, chat, export."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from azgpt.cli import main
from azgpt.use.export import EXPORTED_FILES
from mount_helpers import tmpfs
from process_env import child_env


def strict_json(text: str) -> object:
    """Parse as strict JSON (``Infinity`` / ``NaN`` refused, as jq and most parsers do)."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_writes_null_for_an_infinite_perplexity(tiny_run, tmp_path: Path, capsys) -> None:
    # Logits scaled 1e5 times: a mistaken token costs thousands of nats, so the perplexity overflows.
    raw = torch.load(tiny_run.ckpt, map_location="cpu", weights_only=True)
    raw["state_dict"]["model.transformer.ln_f.weight"].mul_(1e5)
    hot = tmp_path / "hot.ckpt"
    torch.save(raw, hot)
    text = tmp_path / "t.txt"
    text.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    assert main(["evaluate", "--ckpt", str(hot), "--corpus", str(text), "--json", "--device", "cpu"]) == 0
    report = strict_json(capsys.readouterr().out)
    assert report["overall"]["perplexity"] is None and report["overall"]["loss"] > 709
    assert main(["evaluate", "--ckpt", str(hot), "--corpus", str(text), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-4].split()[-2] == "inf"  # the table's overall row


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_chat_keeps_the_session_past_the_largest_seed_and_a_line_of_bad_bytes(tiny_run) -> None:
    """Through the real command and a real pipe: seed 2**64 - 1 lasts every turn (the next seed wraps to 0), and
    bytes that are not UTF-8 are refused as a line, not as the end of the conversation."""
    result = subprocess.run(
        [sys.executable, "-m", "azgpt.cli", "chat", "--ckpt", str(tiny_run.ckpt), "--seed", str(2**64 - 1),
         "--max_new_tokens", "3", "--device", "cpu"],
        input=b"Salam\n\xff\xfe pis\nBak\xc4\xb1\n", capture_output=True, cwd=REPO_ROOT, timeout=300,
        env=child_env(LC_ALL="C.UTF-8", PYTHONIOENCODING=""),
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, err
    assert "Traceback" not in err and "that line is not valid UTF-8 text and was not sent" in err
    assert result.stdout.decode("utf-8").count("azgpt> ") == 2


def test_chat_refuses_a_seed_torch_cannot_take_before_the_first_turn(tiny_run, capsys) -> None:
    assert main(["chat", "--ckpt", str(tiny_run.ckpt), "--seed", str(2**64), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed must be an integer from 0 to 18446744073709551615" in err


def test_the_largest_seed_lasts_every_turn(tiny_run) -> None:
    from azgpt.sampling import Generator, Sampling
    from azgpt.use.chat import ChatSession

    session = ChatSession(Generator.from_checkpoint(tiny_run.ckpt, device="cpu"), None,
                          Sampling(max_new_tokens=2), seed=2**64 - 1)
    for turn in ("Salam", "Bakı", "Necəsən?"):
        "".join(session.reply(turn))
    assert len(session.history) == 6


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_export_into_the_current_empty_folder(tiny_run, tmp_path: Path, monkeypatch, fmt: str) -> None:
    if fmt == "gguf":
        pytest.importorskip("gguf")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", ".", "--format", fmt]) == 0
    names = sorted(p.name for p in here.iterdir())
    assert names == (["Modelfile", "here-f16.gguf"] if fmt == "gguf" else sorted(EXPORTED_FILES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # nothing left beside it
    assert Path.cwd() == here and here.is_dir()  # the shell's folder was filled, not swapped out


def test_sigterm_while_a_folder_is_written_leaves_no_partial_folder(tmp_path: Path) -> None:
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from azgpt.atomic import atomic_folder\n"
              "with atomic_folder(Path(sys.argv[1])) as folder:\n"
              "    (folder / 'big.bin').write_bytes(b'x' * 1000)\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE,
                               cwd=REPO_ROOT, env=child_env())
    assert process.stdout.readline() == b"writing\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert list(tmp_path.iterdir()) == []


def test_export_sweeps_the_partial_folder_of_a_dead_process(tiny_run, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".hf.partial-{socket.gethostname()}-{dead.pid}"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".hf.partial-{socket.gethostname()}-{os.getppid()}"  # a live process: kept
    alive.mkdir()
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", alive.name])


def test_gguf_export_onto_a_full_disk_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    pytest.importorskip("gguf")
    with tmpfs(tmp_path / "small", size="64k") as small:
        code = main(["export", "--ckpt", str(tiny_run.ckpt), "--format", "gguf", "--outtype", "f32",
                     "--out", str(small / "g")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"azgpt: error: cannot write --out {small / 'g'}: the disk is full")
        assert list(small.iterdir()) == []
