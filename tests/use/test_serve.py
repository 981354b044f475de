"""azgpt serve over real HTTP, spoken to by the official openai client (and by raw requests where a client would
not send such a thing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests talk through the openai package (azgpt[dev])")
httpx = pytest.importorskip("httpx")
from serve_helpers import running_server, template_model  # noqa: E402

from azgpt.data.chat import Message  # noqa: E402
from azgpt.sampling import StreamStats  # noqa: E402
from azgpt.use.chat import BASE_MODEL_NOTE  # noqa: E402
from azgpt.use.serve_engine import Engine  # noqa: E402
from azgpt.use.served_model import ServedModel  # noqa: E402
from process_env import child_env  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
QUESTION = "Salam! Azərbaycanın paytaxtı haradır?"


@pytest.fixture(scope="module")
def chat_server(tiny_run):
    with running_server(template_model(tiny_run.ckpt)) as server:
        yield server


@pytest.fixture(scope="module")
def base_server(tiny_run):
    with running_server(ServedModel.from_checkpoint(tiny_run.ckpt, device="cpu", name="tiny")) as server:
        yield server


def client(server, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.api, api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=30,
                         **kwargs)


def expected(server, messages: list[Message], max_tokens: int, seed: int, temperature: float = 1.0):
    """What the model itself writes for this conversation: (text, prompt tokens, tokens sampled, finish reason)."""
    ids, _ = server.model.chat_prompt(messages, max_tokens)
    stats = StreamStats()
    text = server.model.generator.generate(ids, max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                           stats=stats)
    return text, len(ids), stats.tokens, stats.finish_reason


def test_chat_completion_is_the_models_own_reply_with_real_usage(chat_server) -> None:
    reply = client(chat_server).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, seed=7)
    text, prompt_tokens, sampled, finish = expected(chat_server, [Message("user", QUESTION)], 12, seed=7)
    assert reply.object == "chat.completion" and reply.model == "tiny-chat"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, sampled)
    assert reply.usage.total_tokens == prompt_tokens + sampled and sampled >= 1


def test_streamed_chat_gives_the_same_reply_in_pieces_then_done(chat_server) -> None:
    messages = [{"role": "system", "content": "Qısa cavab ver."}, {"role": "user", "content": QUESTION}]
    chunks = list(client(chat_server).chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=20, seed=3, stream=True,
        stream_options={"include_usage": True}))
    text, prompt_tokens, sampled, finish = expected(
        chat_server, [Message("system", "Qısa cavab ver."), Message("user", QUESTION)], 20, seed=3)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.prompt_tokens == prompt_tokens and chunks[-1].usage.completion_tokens == sampled
    raw = httpx.post(chat_server.api + "/chat/completions",
                     json={"messages": messages, "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_text_completions_stream_and_not(base_server) -> None:
    api = client(base_server)
    whole = api.completions.create(model="tiny", prompt="Azərbaycan", max_tokens=10, seed=1, temperature=0.7)
    pieces = list(api.completions.create(model="tiny", prompt="Azərbaycan", max_tokens=10, seed=1, temperature=0.7,
                                         stream=True))
    ids, _ = base_server.model.completion_prompt("Azərbaycan", 10)
    own = base_server.model.generator.generate(ids, max_new_tokens=10, temperature=0.7, seed=1)
    assert whole.choices[0].text == own == "".join(p.choices[0].text for p in pieces)
    assert whole.usage.prompt_tokens == len(ids) and whole.object == "text_completion"


def test_a_base_model_continues_the_chat_and_says_so(base_server) -> None:
    response = client(base_server).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=4)
    assert response.headers["x-azgpt-mode"] == "continuation"
    assert response.parse().model_extra["azgpt_notes"] == [BASE_MODEL_NOTE]


def test_models_and_health(base_server) -> None:
    models = client(base_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client(base_server).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client(base_server).models.retrieve("gpt-4")
    health = httpx.get(base_server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_eight_concurrent_clients_each_get_their_own_answer(chat_server) -> None:
    questions = [f"Sual {i}: {word}?" for i, word in enumerate(
        ["Bakı", "Gəncə", "Şəki", "Quba", "Lənkəran", "Naxçıvan", "Şuşa", "Qəbələ"])]
    expected_replies = [expected(chat_server, [Message("user", q)], 24, seed=100 + i)[0]
                        for i, q in enumerate(questions)]
    api = client(chat_server)
    start = threading.Barrier(8)

    def ask(i: int) -> str:
        start.wait()
        if i % 2:  # half stream, half do not
            stream = api.chat.completions.create(model="tiny-chat", max_tokens=24, seed=100 + i, stream=True,
                                                 messages=[{"role": "user", "content": questions[i]}])
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": questions[i]}],
                                           max_tokens=24, seed=100 + i).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert replies == expected_replies
    assert len(set(expected_replies)) > 1  # the seeds really differ, so a mix-up would show


MALFORMED = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"", 400),
    ("POST", "/v1/chat/completions", b'["a list"]', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": 7}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "seed": "a"}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": null}]}', 400),
    ("POST", "/v1/completions", b'{"prompt": ""}', 400),
    ("POST", "/v1/completions", b'{"prompt": [1, 2, 3]}', 400),
    ("POST", "/v1/completions", b'{"max_tokens": 5}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x"' + b" " * (2 << 20) + b"}", 413),
    ("GET", "/v1/chat/completions", b"", 405),
    ("POST", "/v1/nothing", b"{}", 404),
]


def test_twenty_malformed_requests_get_twenty_json_4xx_and_the_server_still_answers(chat_server) -> None:
    assert len(MALFORMED) == 20
    with httpx.Client(base_url=chat_server.url, timeout=30) as http:
        for method, path, body, status in MALFORMED:
            response = http.request(method, path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (path, body[:80], response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"], response.text
        reply = client(chat_server).chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Salam"}], max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_are_openai_exceptions_with_the_field_named(chat_server) -> None:
    api = client(chat_server)
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert caught.value.param == "temperature" and "temperature must be in [0, 2]" in caught.value.message
    with pytest.raises(openai.BadRequestError, match="the last message must be the user's"):
        api.chat.completions.create(model="tiny-chat", messages=[{"role": "assistant", "content": "x"}])


def test_a_conversation_longer_than_the_block_is_cropped_from_the_oldest_turn_and_said(chat_server) -> None:
    turns = []
    for i in range(30):
        turns += [{"role": "user", "content": f"Sual {i}: bu gün hava necədir?"},
                  {"role": "assistant", "content": "Yaxşıdır."}]
    response = client(chat_server).chat.completions.create(
        model="tiny-chat", messages=[*turns, {"role": "user", "content": "Son sual"}], max_tokens=8)
    assert "forgot the oldest" in " ".join(response.model_extra["azgpt_notes"])
    assert response.usage.prompt_tokens <= chat_server.model.block_size - 8


def test_stop_sequences_end_the_reply_before_them(base_server) -> None:
    api = client(base_server)
    free = api.completions.create(model="tiny", prompt="Bakı", max_tokens=30, seed=5).choices[0].text
    stop = free[5:8]
    assert len(stop) == 3
    cut = api.completions.create(model="tiny", prompt="Bakı", max_tokens=30, seed=5, stop=[stop])
    assert cut.choices[0].text == free[:free.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_the_api_key_is_required_when_set(tiny_run) -> None:
    model = ServedModel.from_checkpoint(tiny_run.ckpt, device="cpu")
    with running_server(model, api_key="sirr") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        assert client(server, api_key="sirr").models.list().data[0].id == "azgpt"
        assert httpx.get(server.url + "/").status_code == 200  # the page itself; its requests carry the key


def test_the_chat_page_is_served_and_needs_no_network(base_server) -> None:
    page = httpx.get(base_server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta charset="utf-8">' in page.text and "Göndər" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text


def endless(model: ServedModel):
    """A recipe that never ends by itself: only cancelling stops it."""
    def recipe(ids, options):
        def start(stats):
            while True:
                stats.tokens += 1
                time.sleep(0.005)
                yield "ə"
        return start
    return recipe


def wait_until_idle(server, seconds: float = 10.0) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the slot was not freed: {health}")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(tiny_run, monkeypatch, stream: bool) -> None:
    model = ServedModel.from_checkpoint(tiny_run.ckpt, device="cpu")
    monkeypatch.setattr(model, "recipe", endless(model))
    with running_server(model, Engine(max_parallel=1, max_queue=0)) as server:
        body = {"messages": [{"role": "user", "content": "Salam"}], "stream": stream}
        if stream:
            with httpx.stream("POST", server.api + "/chat/completions", json=body) as response:
                lines = response.iter_lines()  # (a dropped iterator would close the stream at once)
                assert next(lines).startswith("data: ")
                health = httpx.get(server.url + "/health").json()
                assert health["running"] + health["waiting"] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.api + "/chat/completions", json=body, timeout=0.5)
        wait_until_idle(server)
        # the one place is free again: a new request is not refused
        with httpx.stream("POST", server.api + "/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200


def test_a_full_server_answers_503_at_once(tiny_run, monkeypatch) -> None:
    model = ServedModel.from_checkpoint(tiny_run.ckpt, device="cpu")
    monkeypatch.setattr(model, "recipe", endless(model))
    with running_server(model, Engine(max_parallel=1, max_queue=0)) as server:
        body = {"messages": [{"role": "user", "content": "Salam"}], "stream": True}
        with httpx.stream("POST", server.api + "/chat/completions", json=body) as held:
            lines = held.iter_lines()
            assert next(lines).startswith("data: ")
            with pytest.raises(openai.InternalServerError) as caught:
                client(server).chat.completions.create(model="azgpt", messages=body["messages"])
            assert caught.value.status_code == 503 and "the server is busy" in caught.value.message


def test_serve_without_fastapi_is_one_line(monkeypatch, capsys, tmp_path) -> None:
    import builtins

    from azgpt.cli import main

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err == "azgpt: error: azgpt serve needs FastAPI and uvicorn: pip install 'azgpt[serve]'\n"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_the_serve_command_stops_on_a_signal_with_the_shells_code(tiny_run, signum: int, code: int) -> None:
    process = subprocess.Popen([sys.executable, "-m", "azgpt.cli", "serve", "--ckpt", str(tiny_run.ckpt),
                                "--port", "0"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stderr.readline()
        assert "azgpt serve: azgpt (continuation, block 96) at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        process.send_signal(signum)
        assert process.wait(timeout=30) == code
        assert f"stopped by {signal.Signals(signum).name}" in process.stderr.read()
    finally:
        process.kill()


@pytest.mark.slow
def test_the_throughput_benchmark_runs_end_to_end(tiny_run) -> None:
    """bench/serve_throughput.py against a real azgpt serve process (figures not checked)."""
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, str(repo / "bench" / "serve_throughput.py"), "--ckpt", str(tiny_run.ckpt),
                             "--clients", "1,2", "--requests", "1", "--max-tokens", "4", "--threads", "1"],
                            capture_output=True, text=True, timeout=300, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("command: PYTHONPATH=. python bench/serve_throughput.py --ckpt")
    assert [line.split()[:2] for line in lines[-2:]] == [["1", "1"], ["2", "2"]]
