"""The chat template: how a conversation becomes token ids, and which of them a fine-tune learns from.

A conversation is rendered as ``<|endoftext|>`` then, for each message, its role token, its text and
``<|end|>``::

    <|endoftext|><|user|>Salam!<|end|><|assistant|>Salam, necə kömək edə bilərəm?<|end|>

The role and end tokens are special tokens added to the pretrained tokenizer (``add_to_tokenizer``), so no
text can be split into them by BPE. Only an assistant's text and the ``<|end|>`` after it are trained on (the
response mask); to reply, the model is given the conversation so far plus ``<|assistant|>`` and writes until
``<|end|>``. Instruction data is jsonl, one conversation a line, in either shape::

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from azgpt.data.tokenizer import EOT, encode_text
from azgpt.errors import AzGPTError

TEMPLATE_FORMAT = "azgpt-chat-1"
ROLES = ("system", "user", "assistant")
# What runtimes that render a template into a string (transformers, llama.cpp, Ollama) do with such text: for
# the model cards of the HF and GGUF exports.
TEMPLATE_TEXT_WARNING = (
    "a message whose text spells a template token (`<|user|>`, `<|assistant|>`, `<|system|>`, `<|end|>`, "
    "`<|endoftext|>`) is rendered into the prompt string and tokenised with special tokens parsed, so that text "
    "becomes a real turn boundary: anyone who types it can forge system or assistant turns. Remove or escape such "
    "text in untrusted messages before rendering (azgpt chat and finetune encode message text as plain text).")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatTemplate:
    """Special tokens of the template; stored in a fine-tuned checkpoint as ``to_dict()``."""

    role_tokens: dict[str, str] = field(default_factory=lambda: {
        "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"})
    end_token: str = "<|end|>"

    @property
    def special_tokens(self) -> list[str]:
        return [*(self.role_tokens[role] for role in ROLES), self.end_token]

    def to_dict(self) -> dict[str, Any]:
        return {"format": TEMPLATE_FORMAT, "role_tokens": dict(self.role_tokens), "end_token": self.end_token}

    @classmethod
    def from_dict(cls, stored: dict[str, Any], origin: str = "the checkpoint") -> ChatTemplate:
        if not isinstance(stored, dict) or stored.get("format") != TEMPLATE_FORMAT:
            found = stored.get("format") if isinstance(stored, dict) else type(stored).__name__
            raise AzGPTError(f"{origin} holds a chat template of format {found!r}; this azgpt reads "
                             f"{TEMPLATE_FORMAT!r}: upgrade azgpt")
        return cls(role_tokens=dict(stored["role_tokens"]), end_token=stored["end_token"])

    def add_to_tokenizer(self, tokenizer: Tokenizer) -> Tokenizer:
        """A copy of ``tokenizer`` with the template's special tokens appended (ids after the existing ones).

        Tokens it already has keep their ids, so adding twice changes nothing.
        """
        extended = Tokenizer.from_str(tokenizer.to_str())
        extended.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                     for token in self.special_tokens])
        return extended

    def token_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """Id of each special token (role names, ``"end"`` and ``"eot"``) in a tokenizer that has them."""
        ids = {role: tokenizer.token_to_id(token) for role, token in self.role_tokens.items()}
        ids["end"] = tokenizer.token_to_id(self.end_token)
        ids["eot"] = tokenizer.token_to_id(EOT)
        missing = [name for name, value in ids.items() if value is None]
        if missing:
            raise AzGPTError(f"the tokenizer lacks the chat template's tokens for {', '.join(missing)}: "
                             f"fine-tune the model with azgpt finetune first")
        return ids

    def encode(self, tokenizer: Tokenizer, messages: list[Message],
               add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per id, whether it is response (an assistant's text or its end).

        ``add_generation_prompt`` appends ``<|assistant|>`` (not a response token) for the model to answer.
        A message's text is encoded as text (``encode_text``): template tokens typed in it stay characters.
        """
        ids_of = self.token_ids(tokenizer)
        ids, response = [ids_of["eot"]], [False]
        for message in messages:
            text = encode_text(tokenizer, message.content)
            is_reply = message.role == "assistant"
            ids += [ids_of[message.role], *text, ids_of["end"]]
            response += [False, *([is_reply] * len(text)), is_reply]
        if add_generation_prompt:
            ids.append(ids_of["assistant"])
            response.append(False)
        return ids, response

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, special tokens spelled out (for display and for export's Jinja twin)."""
        text = EOT + "".join(f"{self.role_tokens[m.role]}{m.content}{self.end_token}" for m in messages)
        return text + (self.role_tokens["assistant"] if add_generation_prompt else "")

    def jinja(self) -> str:
        """The same rendering as a Hugging Face ``chat_template`` (Jinja), for exported tokenizers."""
        roles = " ".join(f"{{%- if message['role'] == '{role}' %}}{token}{{%- endif %}}"
                         for role, token in self.role_tokens.items())
        return (f"{EOT}{{%- for message in messages %}}{roles}{{{{ message['content'] }}}}{self.end_token}"
                f"{{%- endfor %}}{{%- if add_generation_prompt %}}{self.role_tokens['assistant']}{{%- endif %}}")


DEFAULT_TEMPLATE = ChatTemplate()


# -- instruction data ---------------------------------------------------------------------------------


def sample_instructions_path() -> Path:
    """The Azerbaijani instruction sample shipped with azgpt (see azgpt/sample_instructions/ORIGIN.md)."""
    return Path(str(resources.files("azgpt") / "sample_instructions" / "instructions.jsonl"))


def parse_conversation(record: Any, where: str) -> list[Message]:
    """One jsonl record as messages, or an ``AzGPTError`` naming ``where`` (file:line) and what is wrong."""
    if not isinstance(record, dict):
        raise AzGPTError(f"{where}: expected a JSON object with \"prompt\" and \"response\" or \"messages\", "
                         f"got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise AzGPTError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        parsed = []
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict):
                raise AzGPTError(f"{where}: message {number} is not an object with \"role\" and \"content\"")
            for key in ("role", "content"):
                if key not in message:
                    raise AzGPTError(f"{where}: message {number} has no \"{key}\" field")
            if message["role"] not in ROLES:
                raise AzGPTError(f"{where}: message {number} has unknown role {message['role']!r}; the roles are "
                                 f"{', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise AzGPTError(f"{where}: message {number}'s \"content\" must be a string")
            parsed.append(Message(message["role"], message["content"]))
        if not any(m.role == "assistant" for m in parsed):
            raise AzGPTError(f"{where}: the conversation has no assistant message, so nothing to learn from")
        return parsed
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        raise AzGPTError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (give \"prompt\" and "
                         f"\"response\", or \"messages\")")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise AzGPTError(f"{where}: \"{key}\" must be a string")
    return [Message("user", record["prompt"]), Message("assistant", record["response"])]


def iter_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Conversations of one jsonl file; blank lines are skipped; any bad line is an error naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise AzGPTError(f"instruction file {path} is a folder, not a .jsonl file: list the .jsonl files inside "
                         f"it in data.files")
    if not path.is_file():
        raise AzGPTError(f"instruction file {path} does not exist: pass a .jsonl of {{\"prompt\", \"response\"}} "
                         f"or {{\"messages\"}} lines")
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AzGPTError(f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line): save the file as "
                                 f"UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AzGPTError(f"{where}: not valid JSON ({exc.msg})") from None
            conversation = parse_conversation(record, where)
            _check_text(conversation, where)
            yield conversation


def _check_text(conversation: list[Message], where: str) -> None:
    """Refuse text JSON can carry but no tokenizer can read: an escaped lone surrogate such as ``"\\ud800"``."""
    for number, message in enumerate(conversation, 1):
        try:
            message.content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise AzGPTError(f"{where}: message {number}'s text holds a lone surrogate "
                             f"({message.content[exc.start]!r}), which is not a character: remove that \\u escape"
                             ) from None


def read_conversations(paths: Iterable[str | Path]) -> list[list[Message]]:
    """Every conversation of every file, in order; an error if there are none."""
    paths = list(paths)
    conversations = [c for path in paths for c in iter_conversations(path)]
    if not conversations:
        raise AzGPTError(f"no conversations in {', '.join(map(str, paths))}")
    return conversations
