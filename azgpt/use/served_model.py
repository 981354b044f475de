"""A model as ``azgpt serve`` uses it: request text -> prompt ids (through chat's template and cropping) and a
recipe for its token stream. Client text never becomes special tokens: the tokenizer reads ``<|end|>`` typed in
a message as plain characters."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from azgpt.data.chat import ChatTemplate, Message
from azgpt.errors import AzGPTError
from azgpt.sampling import Generator, Sampling, StreamStats, crop_note
from azgpt.use.chat import BASE_MODEL_NOTE, ChatSession
from azgpt.use.serve_api import Options


class ServedModel:
    """A ``Generator`` with its chat template (None: a base model, which continues the conversation's text)."""

    def __init__(self, generator: Generator, template: ChatTemplate | None, name: str = "azgpt",
                 created: int | None = None) -> None:
        self.generator = generator
        self.template = template
        self.name = name
        self.created = int(time.time()) if created is None else created
        tokenizer = generator.tokenizer
        tokenizer.encode_special_tokens = True  # special tokens come from the template alone
        self.longest_token = max(len(tokenizer.decode([i], skip_special_tokens=False))
                                 for i in range(tokenizer.get_vocab_size()))  # in characters
        if template is not None:
            generator.stop_ids.add(template.token_ids(generator.tokenizer)["end"])

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        name: str | None = None) -> ServedModel:
        session = ChatSession.from_checkpoint(path, device=device)
        return cls(session.generator, session.template, name or "azgpt", int(Path(path).stat().st_mtime))

    @property
    def block_size(self) -> int:
        return self.generator.model.config.block_size

    @property
    def mode(self) -> str:
        """"chat" (answers in its chat template) or "continuation" (a base model continuing the text)."""
        return "chat" if self.template is not None else "continuation"

    def chat_prompt(self, messages: list[Message], max_tokens: int) -> tuple[list[int], list[str]]:
        """Prompt ids for a reply to ``messages`` (oldest turns dropped to fit, as in ``azgpt chat``) and notes
        saying what was changed."""
        recent = self.recent(messages)
        session = ChatSession(self.generator, self.template, Sampling(max_new_tokens=max_tokens))
        session.history = list(recent[:-1])
        ids = session.prompt_ids(recent[-1].content)
        notes = list(session.notes)
        if len(recent) < len(messages):  # say how many were left out in all, in the words chat uses
            if len(session.history) < len(recent) - 1:
                notes.pop(0)  # chat's own count, of the recent messages only
            forgotten = len(messages) - 1 - len(session.history)
            notes.insert(0, f"the conversation is longer than the model's block of {self.block_size} tokens: "
                            f"forgot the oldest {forgotten} messages")
        return ids, ([] if self.template is not None else [BASE_MODEL_NOTE]) + notes

    def recent(self, messages: list[Message]) -> list[Message]:
        """The newest messages that could still fit in the block (each costs at least one token, and a token is
        at most ``longest_token`` characters long); the older ones could not be seen anyway, and leaving them out
        keeps cropping cheap however long the conversation sent is."""
        budget, kept = self.block_size, 0
        for message in reversed(messages):
            budget -= 1 + len(message.content) // self.longest_token
            if budget < 0 and kept:
                break
            kept += 1
        return messages[-kept:]

    def completion_prompt(self, prompt: str, max_tokens: int) -> tuple[list[int], list[str]]:
        """Prompt ids of a text to continue, cropped from the left so that ``max_tokens`` more fit the block."""
        ids, dropped = self.generator.encode_prompt(prompt)
        total = dropped + len(ids)
        room = self.block_size - min(max_tokens, self.block_size // 2)
        ids = ids[-room:]
        return ids, [crop_note(total, len(ids))] if len(ids) < total else []

    def recipe(self, ids: list[int], options: Options) -> Callable[[StreamStats], Iterator[str]]:
        """What the engine runs for one request: its own stream of text pieces, counting into ``stats``."""
        if not ids:
            raise AzGPTError("the prompt has no tokens")

        def start(stats: StreamStats) -> Iterator[str]:
            return self.generator.stream(ids, max_new_tokens=options.max_tokens, temperature=options.temperature,
                                         top_k=options.top_k, top_p=options.top_p, seed=options.seed, stats=stats)
        return start
