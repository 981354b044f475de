"""Issue 23 (third round of hostile cases) for the use verbs: evaluate, chat, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from azgpt.cli import main


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
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""},
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
