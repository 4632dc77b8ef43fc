"""One generation at a time through the engine, for requests that arrive on many threads.

A bounded FIFO of jobs: HTTP threads submit and read their job's events; the thread that owns
the model runs jobs in arrival order. A batched engine would take several jobs per step here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..engine import Done, Engine, SamplingSettings, Stats, Token, common_prefix
from .wire import ApiError


@dataclass
class Started:
    """The engine took the job: how much of the prompt its KV cache already held."""

    prompt_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    error: BaseException


@dataclass
class Job:
    prompt_ids: list[int]
    settings: SamplingSettings
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()

    def stream(self, client_gone: Callable[[], bool], poll: float = 0.05
               ) -> Iterator[Started | Token | Done]:
        """The job's events until Done; cancels it (and stops) when the client goes away.

        The client is looked at after every event, not only while waiting: a fast engine
        never leaves the queue empty, and a non-streamed reply writes nothing until the end.
        """
        while True:
            try:
                ev = self.events.get(timeout=poll)
            except queue.Empty:
                ev = None
            if client_gone():
                self.cancel()
                return
            if ev is None:
                continue
            if isinstance(ev, Failed):
                raise ev.error
            yield ev
            if isinstance(ev, Done):
                return


class Scheduler:
    """A fair queue in front of one Engine; `run_forever` runs on the thread that owns it."""

    def __init__(self, engine: Engine, max_queue: int,
                 log: Callable[[str], None] | None = None):
        self.engine = engine
        self.log = log or (lambda line: None)
        self.max_queue = max_queue
        self._jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.busy = False

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> Job:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {self.max_queue} requests are already "
                                "waiting for the model; retry later",
                           kind="overloaded") from None
        return job

    def run_forever(self, stop: threading.Event | None = None) -> None:
        # A timeout on get() keeps Ctrl-C (delivered to this, the main, thread) prompt.
        # Batched decoding replaces this loop and run_job, not the jobs: take queued jobs while
        # the batch has room (add), step it, put each (job, Token | Done) on that job's queue,
        # and cancel the rows whose job is cancelled. HTTP threads see the same events.
        while stop is None or not stop.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancelled.is_set():  # its client left while it waited
                continue
            self.busy = True
            try:
                self.run_job(job)
            finally:
                self.busy = False

    def run_job(self, job: Job) -> None:
        engine = self.engine
        ids = job.prompt_ids
        cached = min(common_prefix(engine.cached_ids, ids), len(ids) - 1)
        job.events.put(Started(len(ids), cached))
        t0 = time.perf_counter()
        first: float | None = None
        n = 0
        gen = engine.generate(ids, job.settings)
        try:
            for ev in gen:
                if job.cancelled.is_set():
                    gen.close()  # the engine's cleanup keeps its KV cache consistent
                    self.log(f"kimi serve: generation stopped after {n} tokens (the client "
                             "left or a stop sequence matched)")
                    end = time.perf_counter()
                    first = first or end
                    job.events.put(Done("cancelled", [], Stats(
                        prompt_tokens=len(ids), reused_tokens=cached,
                        prefilled_tokens=len(ids) - cached, generation_tokens=n,
                        prompt_time=first - t0, generation_time=end - first, ttft=first - t0)))
                    return
                if isinstance(ev, Token):
                    n += 1
                    first = first or time.perf_counter()
                if isinstance(ev, (Token, Done)):
                    job.events.put(ev)
        except Exception as e:  # reported to this request; the server goes on
            gen.close()
            job.events.put(Failed(e))
