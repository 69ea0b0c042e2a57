"""The serving scheduler: one worker thread owns the decode engines (one per model and domain) and runs
every admitted sequence one token per step, the sequences of one engine in one batched step (continuous
batching: a request joins a running batch at the next step and leaves it when done). Requests wait in a
bounded queue (full: `Busy`, a 429); a cancelled request (a client gone mid-stream) leaves its slot at the
next step. Engines of different domains never share a batch, so requests for different domains sent at
once get exactly the tokens each gets alone. Stop strings are matched in linear time (`StopStrings`).

    scheduler = Scheduler(max_batch=8).start()
    scheduler.submit([Job(endpoint, ids, Sampler(0.8, 50, 0.95, seed), 64, [], queue, loop)])
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..inference.engine import Sampler, make_engine
from ..inference.generate import TextStream
from .catalog import Endpoint
from .metrics import ServingMetrics
from .protocol import APIError


class Busy(Exception):
    """The request queue is full."""


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log probability and its likeliest alternatives, as (token id, log probability)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprob(logits: torch.Tensor, token: int, alternatives: int) -> TokenLogprob:
    """From the model's raw distribution (before temperature and top-k/p, as vLLM's default
    `raw_logprobs`): what sampling changes is a choice, not the model's belief."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, alternatives) if alternatives else (logp[:0], logp[:0].long())
    return TokenLogprob(token, float(logp[token]), tuple(zip(ids.tolist(), values.tolist())))


def _failure(stop: str) -> list[int]:
    """KMP's failure table: for each prefix of `stop`, the length of its longest proper prefix that is
    also its suffix."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


class StopStrings:
    """Where the first stop string occurs in a growing text, and how much of its end may still become
    one, in time linear in the text (Knuth-Morris-Pratt): per stop, the longest prefix of it that ends
    the text so far, advanced a character at a time. The check it replaces tried every prefix of every
    stop against the text's end at each token: O(L²) a token for a stop of L characters."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.tables = [_failure(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop: the length of its prefix that ends the text
        self.length = 0                        # characters fed so far

    def feed(self, text: str) -> int | None:
        """Read `text`, the text's next characters; where (in the whole text) the earliest stop string
        that they complete starts, or None."""
        first = None
        for k, (stop, table) in enumerate(zip(self.stops, self.tables)):
            q = self.matched[k]
            for i, c in enumerate(text):
                while q and stop[q] != c:
                    q = table[q - 1]
                if stop[q] == c:
                    q += 1
                if q == len(stop):
                    start = self.length + i + 1 - q
                    first = start if first is None else min(first, start)
                    break
            self.matched[k] = q
        self.length += len(text)
        return first

    @property
    def hold(self) -> int:
        """How many characters at the text's end may be the start of a stop string (held back)."""
        return max(self.matched, default=0)


@dataclass(eq=False)
class Job:
    """One sequence to generate (one choice of one request) and where its events go."""
    endpoint: Endpoint
    ids: list[int]
    sampler: Sampler
    max_new: int
    stops: list[str]
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none asked; k: each token's with its k likeliest alternatives
    end_ids: frozenset[int] = frozenset()  # tokens that end it as its tokenizer's EOS does (a chat turn's end)
    cancelled: bool = False
    new_tokens: int = 0
    text: str = ""        # generated so far (before any stop string)
    sent: int = 0         # characters of `text` already sent
    last: int = -1        # the last token sampled (-1: none yet)
    done: bool = False    # finished or failed; its slot is free
    arrived: float = field(default_factory=time.monotonic)
    unsent: list[TokenLogprob] = field(default_factory=list)  # logprobs of tokens whose text is not sent yet
    _stream: TextStream | None = None
    _stops: StopStrings = field(init=False)

    def __post_init__(self):
        self._stops = StopStrings(self.stops)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def send(self, text: str) -> None:
        """A "text" event: the text and the logprobs of the tokens sampled since the last one."""
        self.emit("text", text, self.unsent)
        self.unsent = []


class Scheduler:
    """One worker thread runs every admitted job, one token per step; the jobs of one engine share a
    batched step. At most `max_batch` jobs per engine run at once; at most `max_waiting` wait."""

    def __init__(self, engine: str = "fast", max_batch: int = 8, max_waiting: int = 64, threads: int | None = None):
        self.engine_name, self.max_batch, self.max_waiting, self.threads = engine, max_batch, max_waiting, threads
        self.waiting: deque[Job] = deque()
        self.running: dict[str, dict[int, Job]] = {}  # endpoint id → slot → job
        self.engines: dict[str, object] = {}
        self.lock = threading.Condition()
        self.paused = False  # tests hold the worker to fill the queue
        self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._work, name="expandlm-scheduler", daemon=True)
        self.metrics = ServingMetrics(self.load)

    def prepare(self, endpoints) -> None:
        """Build the engines of `endpoints` now, so that no first request waits for one."""
        for endpoint in endpoints:
            self._engine(endpoint)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()

    def submit(self, jobs: list[Job]) -> None:
        if len(jobs) > self.max_waiting:  # never fits, however long the client waits: not a 429
            raise APIError(400, f"The request asks for {len(jobs)} sequences (n times its prompts), but this server "
                           f"queues at most {self.max_waiting}", param="n")
        with self.lock:
            if self.stopped:
                raise APIError(503, "The server is shutting down", type="server_error", code="unavailable")
            if len(self.waiting) + len(jobs) > self.max_waiting:
                raise Busy()
            self.waiting.extend(jobs)
            self.lock.notify_all()

    def set_paused(self, paused: bool) -> None:
        with self.lock:
            self.paused = paused
            self.lock.notify_all()

    def load(self) -> dict:
        with self.lock:
            return {"waiting": len(self.waiting), "running": sum(len(s) for s in self.running.values()),
                    "steps": self.steps}

    # -- the worker ---------------------------------------------------------------------------------
    def _engine(self, endpoint: Endpoint):
        if endpoint.id not in self.engines:
            self.engines[endpoint.id] = make_engine(self.engine_name, endpoint.served.decode_model(endpoint.domain),
                                                    self.max_batch)
        return self.engines[endpoint.id]

    def _admit(self) -> list[tuple[Job, int]]:
        """Jobs that get a free slot of their engine now, in arrival order (under the lock)."""
        admitted, left = [], deque()
        while self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:  # its client left while it waited
                self.metrics.ended(job.arrived, "abort")
                continue
            slots = self.running.setdefault(job.endpoint.id, {})
            free = [s for s in range(self.max_batch) if s not in slots]
            if free:
                slots[free[0]] = job
                admitted.append((job, free[0]))
            else:
                left.append(job)
        self.waiting = left
        return admitted

    def _work(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.lock:
                while not self.stopped and (self.paused or not (self.waiting or any(self.running.values()))):
                    self.lock.wait()
                if self.stopped:
                    return
                admitted = self._admit()
                batches = {key: dict(slots) for key, slots in self.running.items() if slots}
            for job, slot in admitted:
                self.metrics.prefilled(len(job.ids))
                self._run_batch({slot: job}, lambda engine, job=job, slot=slot: engine.prefill(slot, job.ids)[None])
            fresh = {id(j) for j, _ in admitted}  # they had this step's work: their prompt
            for slots in batches.values():
                for s, j in slots.items():
                    if j.cancelled and not j.done:
                        self._release(j, s)
                live = {s: j for s, j in slots.items() if not (j.cancelled or j.done or id(j) in fresh)}
                if live:
                    self._run_batch(live)
            with self.lock:
                self.steps += 1

    def _run_batch(self, slots: dict[int, Job], forward=None) -> None:
        """One step for the jobs in `slots` (one engine's): a batched decode, or `forward` (a prefill)."""
        jobs = list(slots.values())
        try:
            engine = self._engine(jobs[0].endpoint)
            logits = forward(engine) if forward else engine.decode(list(slots), [j.last for j in jobs])
            for row, (slot, job) in enumerate(slots.items()):
                self._next_token(job, slot, logits[row])
        except Exception as e:  # a failure ends these requests, never the server
            for slot, job in slots.items():
                job.emit("error", f"{type(e).__name__}: {e}")
                self._release(job, slot, "error")

    def _next_token(self, job: Job, slot: int, logits: torch.Tensor) -> None:
        token = job.sampler(logits)
        job.last, job.new_tokens = token, job.new_tokens + 1
        self.metrics.sampled(job.arrived, first=job.new_tokens == 1)
        tokenizer = job.endpoint.tokenizer
        if (token == tokenizer.eos_token_id or token in job.end_ids) and not job.ignore_eos:
            return self._finish(job, slot, "stop")
        if job.logprobs is not None:
            job.unsent.append(token_logprob(logits, token, job.logprobs))
        if job._stream is None:
            job._stream = TextStream(tokenizer)
        new = job._stream.add(token)
        cut = job._stops.feed(new)
        job.text += new
        if cut is not None:
            job.text = job.text[:cut]
            return self._finish(job, slot, "stop")
        hold = job._stops.hold  # a tail that may be the start of a stop string waits
        if len(job.text) - hold > job.sent:
            job.send(job.text[job.sent:len(job.text) - hold])
            job.sent = len(job.text) - hold
        if job.new_tokens >= job.max_new:
            self._finish(job, slot, "length")

    def _finish(self, job: Job, slot: int, reason: str) -> None:
        if len(job.text) > job.sent or job.unsent:
            job.send(job.text[job.sent:])
        job.emit("done", reason, job.new_tokens)
        self._release(job, slot, reason)

    def _release(self, job: Job, slot: int, reason: str = "abort") -> None:
        if not job.done:
            self.metrics.ended(job.arrived, reason)
        job.done = True
        with self.lock:
            slots = self.running.get(job.endpoint.id, {})
            if slots.get(slot) is job:
                del slots[slot]
