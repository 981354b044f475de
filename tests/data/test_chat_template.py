"""The chat template, the response mask and instruction jsonl (azgpt/data/chat.py, azgpt/data/instructions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from azgpt.data.chat import (DEFAULT_TEMPLATE, ChatTemplate, Message, read_conversations,
                             sample_instructions_path)
from azgpt.targets import PAD_TARGET
from azgpt.data.instructions import collate, make_example
from azgpt.data.tokenizer import load_tokenizer, token_byte_lengths
from azgpt.errors import AzGPTError
from azgpt.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def tokenizer(prepared_dir: Path):
    return DEFAULT_TEMPLATE.add_to_tokenizer(load_tokenizer(prepared_dir / "tokenizer.json"))


CONVERSATION = [Message("system", "Qısa cavab ver."), Message("user", "Salam, necəsən?"),
                Message("assistant", "Yaxşıyam, sağ ol."), Message("user", "Çay istəyirsən?"),
                Message("assistant", "Bəli, armudu stəkanda.")]


def test_special_tokens_are_appended_once_and_never_split(prepared_dir: Path, tokenizer) -> None:
    base = load_tokenizer(prepared_dir / "tokenizer.json")
    ids = DEFAULT_TEMPLATE.token_ids(tokenizer)
    assert sorted(ids[name] for name in ("system", "user", "assistant", "end")) == list(
        range(base.get_vocab_size(), base.get_vocab_size() + 4))
    assert DEFAULT_TEMPLATE.add_to_tokenizer(tokenizer).to_str() == tokenizer.to_str()  # adding twice: no change
    assert tokenizer.encode("<|user|>").ids == [ids["user"]]
    lengths = token_byte_lengths(tokenizer)  # special tokens stand for no text bytes
    assert all(lengths[ids[name]] == 0 for name in ("user", "assistant", "end", "eot"))


def test_rendering_and_mask_mark_exactly_the_assistants_text_and_its_end(tokenizer) -> None:
    ids, response = DEFAULT_TEMPLATE.encode(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids, skip_special_tokens=False) == DEFAULT_TEMPLATE.render(CONVERSATION)
    replies = [tokenizer.decode([i for i, r in zip(ids, response) if r and i != DEFAULT_TEMPLATE.token_ids(
        tokenizer)["end"]], skip_special_tokens=False)]
    assert replies == ["Yaxşıyam, sağ ol.Bəli, armudu stəkanda."]
    end = DEFAULT_TEMPLATE.token_ids(tokenizer)["end"]
    assert sum(1 for i, r in zip(ids, response) if r and i == end) == 2  # each reply's <|end|> is learned
    prompt, _ = DEFAULT_TEMPLATE.encode(tokenizer, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt[-1] == DEFAULT_TEMPLATE.token_ids(tokenizer)["assistant"]
    assert ChatTemplate.from_dict(DEFAULT_TEMPLATE.to_dict()) == DEFAULT_TEMPLATE


def test_loss_counts_only_response_positions(tokenizer) -> None:
    """A batch where only response positions contribute: the model's loss equals the mean cross-entropy over
    the reply tokens alone, and the prompt positions get no gradient."""
    examples = [make_example(*DEFAULT_TEMPLATE.encode(tokenizer, conversation), block_size=64)
                for conversation in (CONVERSATION, CONVERSATION[1:3])]
    inputs, targets = collate(examples, pad_id=0)
    ids, response = DEFAULT_TEMPLATE.encode(tokenizer, CONVERSATION)
    row = targets[0, : len(ids) - 1]
    assert torch.equal(row[torch.tensor(response[1:])], torch.tensor(ids[1:])[torch.tensor(response[1:])])
    assert (row[~torch.tensor(response[1:])] == PAD_TARGET).all()
    assert (targets[1, len(examples[1][1]):] == PAD_TARGET).all()  # padding of the shorter row

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=32))
    logits, loss = model(inputs, targets)
    counted = targets != PAD_TARGET
    by_hand = F.cross_entropy(logits[counted], targets[counted])
    assert torch.allclose(loss, by_hand)
    leaf = logits.detach().requires_grad_()
    F.cross_entropy(leaf.view(-1, leaf.size(-1)), targets.view(-1), ignore_index=PAD_TARGET).backward()
    assert (leaf.grad[~counted] == 0).all() and (leaf.grad[counted].abs().sum(-1) > 0).all()


def test_a_conversation_whose_reply_is_cut_off_by_the_block_is_left_out(tokenizer) -> None:
    ids, response = DEFAULT_TEMPLATE.encode(tokenizer, [Message("user", "uzun sual " * 50), Message("assistant", "x")])
    assert make_example(ids, response, block_size=16) is None


def write_lines(path: Path, *records: object) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                    encoding="utf-8")
    return path


def test_both_jsonl_shapes_are_read(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "a.jsonl", {"prompt": "Salam", "response": "Salam!"}, "",
                       {"messages": [{"role": "user", "content": "Necəsən?"},
                                     {"role": "assistant", "content": "Yaxşı."}]})
    assert read_conversations([path]) == [[Message("user", "Salam"), Message("assistant", "Salam!")],
                                          [Message("user", "Necəsən?"), Message("assistant", "Yaxşı.")]]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Salam"}, "a.jsonl:2: missing field 'response'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "a.jsonl:2: message 2 has unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "a.jsonl:2: message 1 has no \"content\" field"),
    ("{not json", "a.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "user", "content": "x"}]}, "a.jsonl:2: the conversation has no assistant message"),
])
def test_bad_lines_name_file_and_line(tmp_path: Path, record: object, message: str) -> None:
    path = write_lines(tmp_path / "a.jsonl", {"prompt": "Salam", "response": "Salam!"}, record)
    with pytest.raises(AzGPTError, match=message.replace("(", r"\(")):
        read_conversations([path])


def test_the_shipped_sample_is_a_few_hundred_azerbaijani_conversations() -> None:
    conversations = read_conversations([sample_instructions_path()])
    assert 300 <= len(conversations) <= 1000
    text = " ".join(m.content for c in conversations for m in c)
    assert all(letter in text for letter in "əıöüğşçİ")
    assert any(len(c) > 2 for c in conversations) and any(c[0].role == "system" for c in conversations)
