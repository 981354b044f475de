"""Issue 23 item 1: the HF model card and the Ollama Modelfile of a fine-tuned model say what their runtimes do
with template tokens typed inside a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from azgpt.cli import main
from azgpt.data.chat import DEFAULT_TEMPLATE

WARNING = "anyone who types it can forge system or assistant turns"


@pytest.fixture(scope="module")
def chat_ckpt(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run given the chat template's tokens and the "azgpt" entry a fine-tune writes (300 + 4 tokens
    still fit the embedding, padded to 320 rows)."""
    raw = torch.load(tiny_run.ckpt, weights_only=True)
    tokenizer = DEFAULT_TEMPLATE.add_to_tokenizer(Tokenizer.from_str(raw["azgpt"]["tokenizer"]))
    raw["hyper_parameters"]["vocab_size"] = tokenizer.get_vocab_size()
    raw["azgpt"] = {**raw["azgpt"], "tokenizer": tokenizer.to_str(), "chat_template": DEFAULT_TEMPLATE.to_dict()}
    path = tmp_path_factory.mktemp("chat") / "chat.ckpt"
    torch.save(raw, path)
    return path


def test_hf_card_warns_about_template_text_only_for_a_chat_model(tiny_run, chat_ckpt: Path, tmp_path: Path) -> None:
    assert main(["export", "--ckpt", str(chat_ckpt), "--out", str(tmp_path / "chat")]) == 0
    card = (tmp_path / "chat" / "README.md").read_text(encoding="utf-8")
    assert "## Chat template" in card and WARNING in card
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(tmp_path / "base")]) == 0
    assert WARNING not in (tmp_path / "base" / "README.md").read_text(encoding="utf-8")


def test_modelfile_warns_about_template_text(chat_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    assert main(["export", "--ckpt", str(chat_ckpt), "--format", "gguf", "--outtype", "f32",
                 "--out", str(tmp_path / "g")]) == 0
    text = (tmp_path / "g" / "Modelfile").read_text(encoding="utf-8")
    comments = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
    assert WARNING in comments
