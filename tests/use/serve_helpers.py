"""Run ``azgpt serve``'s app in a background thread of the test process, on a free port of 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi", reason="azgpt serve needs the serve extra: pip install 'azgpt[serve]'")
import uvicorn  # noqa: E402

from azgpt.data.chat import DEFAULT_TEMPLATE  # noqa: E402
from azgpt.sampling import Generator  # noqa: E402
from azgpt.use.serve import bind, create_app  # noqa: E402
from azgpt.use.serve_engine import Engine  # noqa: E402
from azgpt.use.served_model import ServedModel  # noqa: E402


@dataclass
class Running:
    url: str
    model: ServedModel
    engine: Engine

    @property
    def api(self) -> str:
        return self.url + "/v1"


@contextmanager
def running_server(model: ServedModel, engine: Engine | None = None, **options) -> Iterator[Running]:
    """The app serving ``model`` on a free port until the block ends."""
    engine = engine or Engine()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(model, engine, **options), log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", model, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def template_model(ckpt) -> ServedModel:
    """The tiny base model with the chat template's tokens added, as a fine-tune starts (so it 'chats')."""
    from azgpt.train.finetune import AzGPTFinetune

    module = AzGPTFinetune(init_from=str(ckpt), dropout=0.0)
    tokenizer = DEFAULT_TEMPLATE.add_to_tokenizer(Generator.from_checkpoint(ckpt, device="cpu").tokenizer)
    return ServedModel(Generator(module.model.eval(), tokenizer), DEFAULT_TEMPLATE, name="tiny-chat")
