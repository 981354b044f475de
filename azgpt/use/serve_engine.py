"""The generation engine behind ``azgpt serve``: one worker thread owns the model and advances every running
request one step in turn, so concurrent requests progress together and never share state.

Each request is a ``Job``: a recipe for its own token stream (own prompt, KV cache and random generator), stop
sequences, and an asyncio queue the worker posts its text to. At most ``max_parallel`` jobs run; up to
``max_queue`` more wait; beyond that ``submit`` refuses with a 503 at once. A cancelled job (its client went
away, or the server is stopping) is dropped at its next step, which frees its place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from azgpt.errors import AzGPTError
from azgpt.sampling import StreamStats
from azgpt.use.serve_api import ApiError

log = logging.getLogger("azgpt.serve")


@dataclass(frozen=True)
class Event:
    """What the worker tells a request: a piece of text, the end (with why and how many tokens), or an error."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0


class StopFilter:
    """Cuts streamed text at the first of the stop sequences, holding back any tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop sequence was reached (nothing after it is sent)."""
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        found = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.buffer = self.buffer[:min(found)], ""
            return out, True
        hold = max(self._partial(s) for s in self.stops)
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def _partial(self, stop: str) -> int:
        """Length of the longest end of the buffer that is a beginning of ``stop``."""
        for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
            if self.buffer.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Job:
    """One request's generation. ``start(stats)`` builds its text stream and runs in the worker thread."""

    def __init__(self, start: Callable[[StreamStats], Iterator[str]], stops: tuple[str, ...] = ()) -> None:
        self.start = start
        self.filter = StopFilter(stops)
        self.stats = StreamStats()
        self.cancelled = threading.Event()
        self.finished = False
        self.pieces: Iterator[str] | None = None
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating at the next step (nothing more is posted)."""
        self.cancelled.set()

    def post(self, event: Event) -> None:
        """Called from the worker thread: hand ``event`` to the request's coroutine."""
        if event.kind != "text":
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The job's events up to and including its last ("done" or "error")."""
        while True:
            event = await self._events.get()
            yield event
            if event.kind != "text":
                return


class Engine:
    """The worker thread and its bounded queue (see the module docstring)."""

    def __init__(self, max_parallel: int = 8, max_queue: int = 32) -> None:
        if max_parallel < 1 or max_queue < 0:
            raise AzGPTError(f"--max_parallel must be >= 1 and --max_queue >= 0, got {max_parallel} and {max_queue}")
        self.max_parallel = max_parallel
        self.max_queue = max_queue
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._count = 0  # jobs waiting or running (under the lock)
        self._accepting = True
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def load(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._active), "waiting": len(self._waiting),
                    "max_parallel": self.max_parallel, "max_queue": self.max_queue}

    def start(self) -> None:
        self._running = True
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="azgpt-serve-engine", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """New requests get 503 from now on (the server is shutting down); running ones go on."""
        with self._lock:
            self._accepting = False

    def cancel_all(self) -> None:
        """Cancel every waiting and running job; their clients get an error saying the server is stopping."""
        with self._lock:
            self._accepting = False
            jobs = [*self._waiting, *self._active]
        for job in jobs:
            job.cancel()
            if not job.finished:
                job.post(Event("error", "the server is shutting down; the request was cancelled"))

    def stop(self) -> None:
        """Cancel every job and end the worker thread."""
        self.cancel_all()
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise a 503 ``ApiError`` when the server is full or stopping."""
        with self._lock:
            if not self._accepting:
                raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if self._count >= self.max_parallel + self.max_queue:
                raise ApiError(503, f"the server is busy: {self.max_parallel} requests are running and "
                               f"{self.max_queue} waiting (--max_parallel, --max_queue); try again shortly",
                               code="server_busy", kind="server_error")
            self._count += 1
            self._waiting.append(job)
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._active:
                    self._lock.wait()
                if not self._running:
                    return
                while self._waiting and len(self._active) < self.max_parallel:
                    self._active.append(self._waiting.popleft())
            for job in list(self._active):
                if self._step(job):
                    self._close(job)

    def _close(self, job: Job) -> None:
        close = getattr(job.pieces, "close", None)  # a generator frees its KV cache here
        try:
            if close is not None:
                close()
        except Exception:
            log.exception("closing a finished generation failed")
        with self._lock:
            self._active.remove(job)
            self._count -= 1

    def _step(self, job: Job) -> bool:
        """Advance ``job`` by one piece of text; True when it is over."""
        if job.cancelled.is_set():
            return True
        try:
            if job.pieces is None:
                job.pieces = job.start(job.stats)
            piece = next(job.pieces)
        except StopIteration:
            tail = job.filter.flush()
            if tail:
                job.post(Event("text", tail))
            job.post(Event("done", finish_reason=job.stats.finish_reason, completion_tokens=job.stats.tokens))
            return True
        except Exception as exc:  # one request's failure never stops the others
            log.exception("generation failed")
            job.post(Event("error", f"generation failed: {type(exc).__name__}: {exc}"))
            return True
        text, stopped = job.filter.feed(piece)
        if text:
            job.post(Event("text", text))
        if stopped:
            job.post(Event("done", finish_reason="stop", completion_tokens=job.stats.tokens))
        return stopped
