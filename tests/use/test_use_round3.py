"""Issue 23 (third round of hostile cases) for the use verbs: evaluate, chat, export."""

from __future__ import annotations

import io
import json
import math
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
