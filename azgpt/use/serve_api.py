"""The OpenAI request shapes ``azgpt serve`` accepts: raw body -> checked request, or an ``ApiError`` (a 4xx with
an OpenAI-style JSON error naming the field). No web framework here, so the rules are testable on their own."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from azgpt.data.chat import ROLES, Message
from azgpt.sampling import MAX_SEED

MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Options:
    """Sampling and output options shared by chat and text completions."""

    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: list[Message]
    options: Options


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str
    options: Options


@dataclass(frozen=True)
class Limits:
    """What the served model allows: its block (context) and the reply length used when none is asked for."""

    block_size: int
    default_max_tokens: int


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {exc.start})",
                       code="invalid_utf8") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column "
                       f"{exc.colno})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                       code="invalid_json")
    return body


def _text(value: Any, param: str) -> str:
    """A JSON string that is whole UTF-8 text (JSON escapes can carry lone surrogates, which are not)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string, got {_kind(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate at character {exc.start})",
                       param, code="invalid_utf8") from None
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                          list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _number(body: dict[str, Any], name: str, default: float | None, low: float, high: float,
            low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, got {_kind(value)}", name)
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ApiError(400, f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {_kind(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be from {low} to {high}, got {value}", name)
    return value


def parse_options(body: dict[str, Any], limits: Limits) -> Options:
    """Sampling options of a chat or completion request, each checked and named when wrong."""
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    max_tokens = _integer(body, "max_tokens", 1, limits.block_size)
    if body.get("n") not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.get('n')!r}", "n")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (_text(stop, "stop"),)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP_SEQUENCES:
        stops = tuple(_text(s, f"stop[{i}]") for i, s in enumerate(stop))
    else:
        raise ApiError(400, f"stop must be a string or an array of at most {MAX_STOP_SEQUENCES} strings", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop sequences must not be empty", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {_kind(stream)}", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Options(
        max_tokens=max_tokens if max_tokens is not None else min(limits.default_max_tokens, limits.block_size),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 1, 2**31 - 1),
        stop=stops,
        seed=_integer(body, "seed", 0, MAX_SEED),
        stream=stream,
        include_usage=bool(stream_options.get("include_usage", False)),
    )


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or OpenAI's array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"{param}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                               f"this model reads text only", f"{param}[{i}]")
            parts.append(_text(part.get("text"), f"{param}[{i}].text"))
        return "".join(parts)
    return _text(value, param)


def parse_chat(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """A ``/v1/chat/completions`` body: non-empty messages of known roles, ending with the user's turn."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array of {\"role\", \"content\"} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with \"role\" and \"content\"", where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if "content" not in message or message["content"] is None:
            raise ApiError(400, f"{where} has no content", f"{where}.content")
        parsed.append(Message(role, _content(message["content"], f"{where}.content")))
    if parsed[-1].role != "user":
        raise ApiError(400, f"the last message must be the user's (got {parsed[-1].role!r}): the model answers the "
                       f"user's turn", f"messages[{len(parsed) - 1}].role")
    if not parsed[-1].content.strip():
        raise ApiError(400, "the last user message is empty: there is nothing to answer",
                       f"messages[{len(parsed) - 1}].content")
    return ChatRequest(parsed, parse_options(body, limits))


def parse_completion(body: dict[str, Any], limits: Limits) -> CompletionRequest:
    """A ``/v1/completions`` body: one non-empty prompt string (or an array holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ApiError(400, "prompt must be one string (arrays of several prompts or of token ids are not "
                       "supported)", "prompt")
    if prompt is None:
        raise ApiError(400, "prompt is missing: give the text to continue", "prompt")
    prompt = _text(prompt, "prompt")
    if not prompt:
        raise ApiError(400, "prompt is empty: give some text to continue", "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo")
    return CompletionRequest(prompt, parse_options(body, limits))
