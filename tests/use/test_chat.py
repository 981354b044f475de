"""azgpt chat: history, cropping, commands, and the REPL driven through stdin."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from azgpt.data.chat import DEFAULT_TEMPLATE, Message
from azgpt.errors import AzGPTError
from azgpt.train.finetune import AzGPTFinetune
from azgpt.use.chat import BASE_MODEL_NOTE, ChatSession, run_repl
from azgpt.sampling import Generator, Sampling
from process_env import child_env

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def session(tiny_run) -> ChatSession:
    """Template mode on the tiny base model with the template's tokens added (as a fine-tune starts)."""
    module = AzGPTFinetune(init_from=str(tiny_run.ckpt), dropout=0.0)
    generator = Generator(module.model.eval(), DEFAULT_TEMPLATE.add_to_tokenizer(
        Generator.from_checkpoint(tiny_run.ckpt, device="cpu").tokenizer))
    return ChatSession(generator, DEFAULT_TEMPLATE, Sampling(max_new_tokens=6, temperature=0.0))


def record_prompts(session: ChatSession) -> list[list[int]]:
    prompts: list[list[int]] = []
    stream = session.generator.stream

    def spy(ids, **kwargs):
        prompts.append(list(ids))
        return stream(ids, **kwargs)

    session.generator.stream = spy
    return prompts


def repl(session: ChatSession, text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_repl(session, io.StringIO(text), out, err)
    return code, out.getvalue(), err.getvalue()


def test_two_turns_the_second_sees_the_first_reset_forgets_and_eof_exits_0(session: ChatSession) -> None:
    prompts = record_prompts(session)
    code, out, err = repl(session, "Salam\nNecəsən?\n/history\n/reset\n/history\nSalam\n")
    assert code == 0
    tokenizer = session.generator.tokenizer
    first_turn = session.template.render([Message("user", "Salam")])
    # The second prompt holds the first question and the first reply, then the second question.
    second = tokenizer.decode(prompts[1], skip_special_tokens=False)
    assert second.startswith(first_turn + "<|assistant|>") and second.endswith("<|user|>Necəsən?<|end|><|assistant|>")
    assert "[user] Salam\n[assistant] " in out and "[user] Necəsən?" in out
    assert "the conversation is forgotten\nsiz> /history\n(no history)" in out
    assert prompts[2] == prompts[0]  # after /reset the model sees only the new question, as at the start
    assert out.count("azgpt> ") == 3 and BASE_MODEL_NOTE not in err


def test_commands_change_sampling_and_bad_values_are_one_line(session: ChatSession) -> None:
    code, out, err = repl(session, "/temp 0.5\n/topk 40\n/topp 0.9\n/tokens 12\n/topk off\n/topp 2\n/topk x\n/nope\n")
    assert code == 0
    assert session.sampling == Sampling(max_new_tokens=12, temperature=0.5, top_k=None, top_p=0.9)
    assert "top_p must be in (0, 1], got 2.0" in err and "/topk takes an integer, got 'x'" in err
    assert "unknown command /nope" in err
    with pytest.raises(AzGPTError):
        session.command("/temp -1")


def test_history_is_cropped_from_the_oldest_turn(session: ChatSession) -> None:
    block = session.block_size
    for i in range(12):
        session.history += [Message("user", f"Sual nömrə {i}: bu gün hava necədir?"), Message("assistant", "Yaxşıdır.")]
    ids = session.prompt_ids("Son sual")
    assert len(ids) <= session.room_for_prompt() < block
    assert session.history and session.history[0].role == "user"  # whole turns were dropped, oldest first
    assert session.history[-1] == Message("assistant", "Yaxşıdır.") and "Sual nömrə 11" in session.history[-2].content
    assert "forgot the oldest" in session.notes[0]


def test_a_question_longer_than_the_block_is_cropped_with_a_note(session: ChatSession) -> None:
    tokens = DEFAULT_TEMPLATE.token_ids(session.generator.tokenizer)
    code, out, err = repl(session, "uzun sual " * 80 + "\n")
    assert code == 0 and "note: the prompt has" in err and "kept the last" in err
    ids = session.prompt_ids("uzun sual " * 80)
    assert len(ids) == session.room_for_prompt()
    assert ids[:2] == [tokens["eot"], tokens["user"]] and ids[-2:] == [tokens["end"], tokens["assistant"]]


def test_a_base_model_continues_text_and_says_so_once(tiny_run) -> None:
    """Through the real command and a real stdin pipe: two lines, then end of input (Ctrl-D) exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "azgpt.cli", "chat", "--ckpt", str(tiny_run.ckpt), "--temperature", "0",
         "--max_new_tokens", "4", "--device", "cpu"],
        input="Salam\nBakı\n", capture_output=True, text=True, encoding="utf-8", cwd=REPO_ROOT, timeout=300,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(BASE_MODEL_NOTE) == 1
    assert result.stdout.count("azgpt> ") == 2 and result.stdout.endswith("siz> \n")


def test_a_missing_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    from azgpt.cli import main

    assert main(["chat", "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["/quit", "/exit"])
def test_quit_and_exit_leave_like_ctrl_d(session: ChatSession, command: str) -> None:
    """What people type to leave: exit 0 at once, the lines after it never read or answered."""
    prompts = record_prompts(session)
    code, out, err = repl(session, f"Salam\n{command}\nNecəsən?\n")
    assert code == 0 and len(prompts) == 1
    assert "unknown command" not in err and "Necəsən?" not in out
