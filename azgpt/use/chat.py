"""Talk with a model in the terminal: ``azgpt chat --ckpt CKPT``.

A fine-tuned checkpoint (``azgpt finetune``) carries its chat template, and each reply is the model's answer
to the conversation so far, rendered with it. A base model has none: each reply is then a plain continuation
of the conversation's text, and the session says so once. The history is cropped from the oldest turn so the
prompt and a reply fit in the model's block. Commands: /reset, /temp T, /topk K|off, /topp P|off,
/tokens N, /history, /help; Ctrl-D (end of input) leaves.

    from azgpt.use.chat import ChatSession
    session = ChatSession.from_checkpoint("last.ckpt")
    for piece in session.reply("Salam!"):
        print(piece, end="")
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch

from azgpt.artifact import load_model
from azgpt.data.chat import ChatTemplate, Message
from azgpt.data.tokenizer import encode_text
from azgpt.errors import AzGPTError
from azgpt.sampling import MAX_SEED, Generator, Sampling, check_seed, crop_note
from azgpt.use.generate import parse_device, utf8_stdout

BASE_MODEL_NOTE = ("this checkpoint has no chat template (a base model, not fine-tuned with azgpt finetune): "
                   "each reply is a plain continuation of the conversation's text")
QUIT_COMMANDS = ("/quit", "/exit")
HELP = """commands:
  /reset        forget the conversation
  /temp T       sampling temperature (0 = greedy)
  /topk K       sample among the K likeliest tokens (/topk off: no cut)
  /topp P       sample among the likeliest tokens holding probability P (/topp off: no cut)
  /tokens N     longest reply, in tokens
  /history      show the turns the model still sees
  /help         this list
  /quit, /exit  leave (as Ctrl-D does)"""


class ChatSession:
    """A conversation with one model: its history, sampling settings, and how a prompt is built."""

    def __init__(self, generator: Generator, template: ChatTemplate | None, sampling: Sampling | None = None,
                 seed: int | None = None) -> None:
        check_seed(seed)
        self.generator = generator
        self.template = template
        self.sampling = sampling or Sampling(max_new_tokens=128)
        self.seed = seed
        self.history: list[Message] = []
        self.notes: list[str] = []  # what the last prompt had to drop, for the caller to show
        if template is not None:
            generator.stop_ids.add(template.token_ids(generator.tokenizer)["end"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        sampling: Sampling | None = None, seed: int | None = None) -> ChatSession:
        checkpoint = load_model(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        stored = checkpoint.chat_template
        template = ChatTemplate.from_dict(stored, origin=str(path)) if stored else None
        return cls(Generator(checkpoint.build_model(device), checkpoint.tokenizer), template, sampling, seed)

    @property
    def block_size(self) -> int:
        return self.generator.model.config.block_size

    def room_for_prompt(self) -> int:
        """Prompt tokens that still leave a reply of max_new_tokens (at most half the block) in the block."""
        return self.block_size - min(self.sampling.max_new_tokens, self.block_size // 2)

    def reset(self) -> None:
        self.history = []

    def encode(self, messages: list[Message]) -> list[int]:
        """The prompt for a reply to ``messages``: template-rendered, or the turns' text one per line."""
        if self.template is not None:
            return self.template.encode(self.generator.tokenizer, messages, add_generation_prompt=True)[0]
        text = "\n".join(message.content for message in messages)
        return encode_text(self.generator.tokenizer, text)

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of the conversation plus ``user_text``, dropping the oldest turns while it is too long; a
        message too long on its own is cropped from the left, with a note in ``self.notes``."""
        self.notes = []
        room = self.room_for_prompt()
        messages = [*self.history, Message("user", user_text)]
        dropped = 0
        ids = self.encode(messages)
        while len(ids) > room and len(messages) > 1:
            messages = messages[2:] if messages[0].role == "user" and len(messages) > 2 else messages[1:]
            dropped = len(self.history) + 1 - len(messages)
            ids = self.encode(messages)
        if dropped:
            self.history = messages[:-1]
            self.notes.append(f"the conversation is longer than the model's block of {self.block_size} tokens: "
                              f"forgot the oldest {dropped} messages")
        if len(ids) > room:
            self.notes.append(crop_note(len(ids), room))
            ids = self._crop_message(ids, room)
        return ids

    def _crop_message(self, ids: list[int], room: int) -> list[int]:
        """Keep the template's framing (end-of-text, role, end, assistant tokens) and the message's last tokens."""
        if self.template is None:
            return ids[-room:]
        head, tail = ids[:2], ids[-2:]  # <|endoftext|><|user|> ... <|end|><|assistant|>
        return head + ids[2:-2][-(room - 4):] + tail

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the model's reply to ``user_text``; the turn joins the history once the reply is complete."""
        ids = self.prompt_ids(user_text)
        # one seed per turn, wrapping past 2**64 - 1 so that every seed the user may give lasts the whole session
        seed = None if self.seed is None else (self.seed + len(self.history)) % (MAX_SEED + 1)
        pieces: list[str] = []
        s = self.sampling
        for piece in self.generator.stream(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                           top_k=s.top_k, top_p=s.top_p, seed=seed):
            pieces.append(piece)
            yield piece
        self.history += [Message("user", user_text), Message("assistant", "".join(pieces))]

    def command(self, line: str) -> str:
        """Run a ``/command``; returns what to tell the user. Bad values raise ``AzGPTError``."""
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if name == "/reset":
            self.reset()
            return "the conversation is forgotten"
        if name == "/history":
            if not self.history:
                return "(no history)"
            return "\n".join(f"[{m.role}] {m.content}" for m in self.history)
        if name == "/help":
            return HELP
        setters = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float),
                   "/tokens": ("max_new_tokens", int)}
        if name not in setters:
            raise AzGPTError(f"unknown command {name}; /help lists them")
        field, kind = setters[name]
        if not value:
            return f"{field} = {getattr(self.sampling, field)}"
        if value == "off" and field in ("top_k", "top_p"):
            parsed = None
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise AzGPTError(f"{name} takes a{'n integer' if kind is int else ' number'}, got {value!r}") from None
        self.sampling = replace(self.sampling, **{field: parsed})
        return f"{field} = {parsed}"


def is_text(line: str) -> bool:
    """Whether ``line`` is real text: bytes that are not UTF-8 reach Python as lone surrogates."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def run_repl(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read lines until end of input, answering each; returns the exit code (0 at Ctrl-D, 130 at Ctrl-C)."""
    interactive = stdin.isatty()
    if session.template is None:
        print(f"azgpt chat: note: {BASE_MODEL_NOTE}", file=stderr)
    print("azgpt chat: /help lists the commands, /quit or Ctrl-D leaves", file=stderr)
    while True:
        try:
            if interactive and stdin is sys.stdin:
                line = input("siz> ")
            else:
                stdout.write("siz> ")
                stdout.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
                shown = line.encode("utf-8", "backslashreplace").decode("utf-8")  # undecodable bytes as \udcXX
                stdout.write(shown if shown.endswith("\n") else shown + "\n")
        except EOFError:
            stdout.write("\n")
            stdout.flush()
            return 0
        except KeyboardInterrupt:
            stdout.write("\n")
            return 130
        line = line.strip()
        if not line:
            continue
        if not is_text(line):
            print("azgpt chat: that line is not valid UTF-8 text and was not sent; type it again",
                  file=stderr, flush=True)
            continue
        if line in QUIT_COMMANDS:
            return 0
        if line.startswith("/"):
            try:
                print(session.command(line), file=stdout, flush=True)
            except AzGPTError as exc:
                print(f"azgpt chat: {exc}", file=stderr, flush=True)
            continue
        try:
            pieces = session.reply(line)
            first = next(pieces, "")  # the prompt is built (and any note known) before the first piece
            for note in session.notes:
                print(f"azgpt chat: note: {note}", file=stderr, flush=True)
            stdout.write("azgpt> " + first)
            stdout.flush()
            for piece in pieces:
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the session
            stdout.write(" [stopped]")
        stdout.write("\n")
        stdout.flush()


def chat_command(ckpt: Path, temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                 max_new_tokens: int = 128, seed: int | None = None, device: str | None = None) -> int:
    """Talk with a model in the terminal, replies streamed as they are written. A checkpoint fine-tuned with
    azgpt finetune answers in its chat template; a base model continues the conversation's text.

    Args:
        ckpt: checkpoint written by azgpt finetune (or azgpt fit, for plain continuation).
        temperature: sampling temperature; 0 = greedy (/temp changes it during the session).
        top_k: sample among the K likeliest tokens (/topk).
        top_p: sample among the likeliest tokens holding probability P, in (0, 1] (/topp).
        max_new_tokens: longest reply in tokens (/tokens).
        seed: seed for reproducible replies.
        device: cpu, cuda, cuda:1... (default: cuda if available).
    """
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
    check_seed(seed)
    session = ChatSession.from_checkpoint(ckpt, device=parse_device(device), sampling=sampling, seed=seed)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, refused line by line
        sys.stdin.reconfigure(errors="surrogateescape")
    return run_repl(session, sys.stdin, utf8_stdout(), sys.stderr)
