"""Generations for requests that arrive on many threads: one running batch, or one at a time.

A bounded FIFO of jobs: HTTP threads submit and read their job's events; the thread that owns
the model admits jobs into one continuously batched decode (or, with --parallel 1, runs them one
by one through the engine) and puts each choice's events on its job's queue.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .. import config
from ..engine import Done, Engine, SamplingSettings, Stats, Token, common_prefix
from .wire import ApiError

STOPPED = "kimi serve: generation stopped after {} tokens (the client left or a stop sequence " \
          "matched)"


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
    n: int = 1  # choices: sequences of the same prompt, seeds seed, seed+1, ...
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: queue.Queue = field(default_factory=queue.Queue)  # (choice, event) pairs
    submitted: float = field(default_factory=time.perf_counter)
    stopped: set[int] = field(default_factory=set)  # choices a stop sequence ended
    peak_batch: int = 0  # the most sequences decoded at once while this job ran

    def cancel(self) -> None:
        self.cancelled.set()

    def stop_choice(self, index: int) -> None:
        """One choice is complete (a stop sequence): its sequence leaves, the others go on."""
        self.stopped.add(index)
        if len(self.stopped) >= self.n:
            self.cancel()

    def stream(self, client_gone: Callable[[], bool], poll: float = 0.05
               ) -> Iterator[tuple[int, Started | Token | Done]]:
        """(choice, event) pairs until every choice is Done; cancels the job (and stops) when
        the client goes away.

        The client is looked at after every event, not only while waiting: a fast engine
        never leaves the queue empty, and a non-streamed reply writes nothing until the end.
        """
        done = 0
        while True:
            try:
                item = self.events.get(timeout=poll)
            except queue.Empty:
                item = None
            if client_gone():
                self.cancel()
                return
            if item is None:
                continue
            if isinstance(item, Failed):
                raise item.error
            yield item
            if isinstance(item[1], Done):
                done += 1
                if done >= self.n:
                    return


def choice_seeds(settings: SamplingSettings, n: int) -> list[SamplingSettings]:
    """Each choice's settings: the request's seed for the first, then seed+1, seed+2, ..."""
    if n == 1:
        return [settings]
    if settings.temperature == 0:
        return [settings] * n
    base = settings.seed
    if base is None:
        base = random.SystemRandom().randrange(config.SEED_MAX)
    return [replace(settings, seed=(base + i) % (config.SEED_MAX + 1)) for i in range(n)]


def cancelled_done(done: Done) -> Done:
    """A sequence the server stopped (client gone, stop sequence) ends as "cancelled"."""
    return Done("cancelled", done.token_ids, done.stats)


class Scheduler:
    """A fair queue in front of one model; `run_forever` runs on the thread that owns it.

    `parallel` sequences at most are decoded at once; 1 runs jobs one at a time through the
    engine. Either way the last sequence to finish leaves its KV (prompt and reply) for reuse.
    """

    def __init__(self, engine: Engine, max_queue: int,
                 log: Callable[[str], None] | None = None, parallel: int = 1):
        self.engine = engine
        self.log = log or (lambda line: None)
        self.max_queue = max_queue
        self.parallel = parallel
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self.running: dict[int, tuple[Job, int]] = {}  # batch uid -> (job, choice)
        self._solo = False  # a --parallel 1 job is running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._solo or bool(self.running)

    def submit(self, job: Job) -> Job:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise ApiError(503, f"the server is busy: {self.max_queue} requests are "
                                    "already waiting for the model; retry later",
                               kind="overloaded")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def _take(self, room: int, timeout: float) -> Job | None:
        """The first waiting job if its choices fit in `room` sequences (FIFO: none skips it)."""
        with self._lock:
            if not self._waiting and timeout:
                self._lock.wait(timeout)
            while self._waiting and self._waiting[0].cancelled.is_set():
                self._waiting.popleft()  # its client left while it waited
            if self._waiting and self._waiting[0].n <= room:
                return self._waiting.popleft()
        return None

    def run_forever(self, stop: threading.Event | None = None) -> None:
        # A timeout on the wait keeps Ctrl-C (delivered to this, the main, thread) prompt.
        if self.parallel == 1:
            while stop is None or not stop.is_set():
                job = self._take(1, 0.2)
                if job is None:
                    continue
                self._solo = True
                try:
                    self.run_job(job)
                finally:
                    self._solo = False
            return
        from ..batch import BatchDecoder

        decoder = BatchDecoder(self.engine.model, self.engine.tokenizer, self.engine, keep_kv=True)
        try:
            while stop is None or not stop.is_set():
                self._admit(decoder)
                if not decoder.busy:
                    continue
                self._drop_cancelled(decoder)
                self._step(decoder)
        finally:
            for uid, done in decoder.cancel_all():
                job, choice = self.running.pop(uid)
                job.events.put((choice, cancelled_done(done)))

    # -- the batch --------------------------------------------------------------------------

    def _admit(self, decoder) -> None:
        """Prefill waiting jobs while the batch has room; they join at the next step."""
        while True:
            room = self.parallel - len(self.running)
            job = self._take(room, 0 if self.running else 0.2)
            if job is None:
                return
            ids = job.prompt_ids
            cached = min(common_prefix(self.engine.cached_ids, ids), len(ids) - 1)
            uids: list[int] = []
            try:
                for choice, settings in enumerate(choice_seeds(job.settings, job.n)):
                    job.events.put((choice, Started(len(ids), cached)))
                    uid = decoder.add(ids, settings)
                    uids.append(uid)
                    self.running[uid] = (job, choice)
            except Exception as e:  # reported to this request; the batch goes on
                for uid in uids:
                    decoder.cancel(uid)
                    self.running.pop(uid, None)
                job.events.put(Failed(e))
                continue
            size = len(self.running)
            for j, _ in self.running.values():
                j.peak_batch = max(j.peak_batch, size)

    def _drop_cancelled(self, decoder) -> None:
        """Sequences whose client left, or whose choice a stop sequence ended, leave now."""
        for uid, (job, choice) in list(self.running.items()):
            if job.cancelled.is_set() or choice in job.stopped:
                done = decoder.cancel(uid)
                if done is None:  # it has finished: its Done comes with the next step
                    continue
                del self.running[uid]
                self.log(STOPPED.format(len(done.token_ids)))
                job.events.put((choice, cancelled_done(done)))

    def _step(self, decoder) -> None:
        try:
            events = decoder.step()
        except Exception as e:  # the model failed: every running request hears it
            decoder.cancel_all()
            jobs = {id(j): j for j, _ in self.running.values()}
            self.running.clear()
            for job in jobs.values():
                job.events.put(Failed(e))
            return
        for uid, ev in events:
            job, choice = self.running[uid]
            job.events.put((choice, ev))
            if isinstance(ev, Done):
                del self.running[uid]

    # -- one at a time ----------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        engine = self.engine
        ids = job.prompt_ids
        cached = min(common_prefix(engine.cached_ids, ids), len(ids) - 1)
        job.peak_batch = 1
        job.events.put((0, Started(len(ids), cached)))
        t0 = time.perf_counter()
        first: float | None = None
        n = 0
        gen = engine.generate(ids, job.settings)
        try:
            for ev in gen:
                if job.cancelled.is_set():
                    gen.close()  # the engine's cleanup keeps its KV cache consistent
                    self.log(STOPPED.format(n))
                    end = time.perf_counter()
                    first = first or end
                    job.events.put((0, Done("cancelled", [], Stats(
                        prompt_tokens=len(ids), reused_tokens=cached,
                        prefilled_tokens=len(ids) - cached, generation_tokens=n,
                        prompt_time=first - t0, generation_time=end - first, ttft=first - t0))))
                    return
                if isinstance(ev, Token):
                    n += 1
                    first = first or time.perf_counter()
                if isinstance(ev, (Token, Done)):
                    job.events.put((0, ev))
        except Exception as e:  # reported to this request; the server goes on
            gen.close()
            job.events.put(Failed(e))
