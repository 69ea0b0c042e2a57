"""`expandlm serve`: the OpenAI-compatible HTTP API (as vLLM, llama.cpp's server and TGI offer it) and a
web page, over one or more model folders.

Three parts, one job each:
- `Catalog`: the served models and their domains; every domain of every model is a model id
  (`MODEL/DOMAIN`, or the bare domain name where one model serves it), plus `auto`, which routes a
  request with `expandlm.routing` and says which domain answered.
- `Scheduler`: one worker thread that owns the decode engines (one per model and domain) and runs
  every admitted sequence one token per step, the sequences of one engine in one batched step
  (continuous batching: a request joins a running batch at the next step and leaves it when done).
  Requests wait in a bounded queue (full: 429); a cancelled request (a client gone mid-stream)
  leaves its slot at the next step. Engines of different domains never share a batch, so requests for
  different domains sent at once get exactly the tokens each gets alone.
- the FastAPI app: request validation (pydantic), OpenAI's response and error shapes, server-sent
  events ending in `data: [DONE]`. What a request may cost is bounded: its body's size and the time it
  takes to arrive (`BodyLimits`), the length of a request that is read (`routing.MAX_REQUEST_CHARS`;
  read in a worker thread, off the event loop), its stop strings (`MAX_STOPS`, `MAX_STOP_CHARS`,
  matched in linear time by `StopStrings`), and the sequences it asks for (`n`: the queue's size).
  A chat is made a domain's prompt (`chat_prompt`), except for a plain domain whose tokenizer has a
  chat template (an instruct checkpoint's): that template renders it and its turn's end stops it, as in vLLM.
"""
from __future__ import annotations

import asyncio
import functools
import json
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..domains import Domain
from ..inference.engine import Sampler, make_engine
from ..errors import UserError
from ..inference.generate import TextStream, request_ids
from ..routing.router import Route, load_router, route_request, split_request
from ..routing import router as routing
from ..formats.checkpoint import BASE_DOMAIN
from ..formats.served import ServedModel, load_served

STATIC = Path(__file__).parent / "static"
AUTO = "auto"


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# -- the models -------------------------------------------------------------------------------------

@dataclass
class Endpoint:
    """One served domain of one model: what a model id names."""
    id: str
    served: ServedModel
    domain: str

    @functools.cached_property  # looked up once: the decode loop asks for it every token
    def tokenizer(self):
        return self.served.tokenizer_for(self.domain)

    @functools.cached_property
    def context(self) -> int:
        return self.served.for_domain(self.domain).config.max_position_embeddings

    @functools.cached_property
    def chat_template(self) -> bool:
        """Chat uses the tokenizer's own template: a plain domain (a pretrained checkpoint's own
        behaviour) whose tokenizer has one, as an instruct model's has. expandlm's domains have none."""
        return self.domain in self.served.card.plain and bool(getattr(self.tokenizer, "chat_template", None))

    @functools.cached_property
    def end_of_turn(self) -> frozenset[int]:
        """The tokens that end an assistant's turn besides the tokenizer's EOS: the generation config's
        `eos_token_id`, one id or a list (Qwen's <|im_end|> and <|endoftext|>), as vLLM stops on them."""
        config = getattr(self.served.for_domain(self.domain), "generation_config", None)
        ids = getattr(config, "eos_token_id", None)
        return frozenset([ids] if isinstance(ids, int) else ids or [])


class Catalog:
    """Every domain of every model folder, by model id."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise UserError("serve needs at least one model folder")
        self.models = models
        names = [m.path.name for m in models]
        self.endpoints: dict[str, Endpoint] = {}
        for i, served in enumerate(models):
            name = names[i] if names.count(names[i]) == 1 else f"{names[i]}-{i}"
            for domain in served.domains or []:
                self.endpoints[f"{name}/{domain}"] = Endpoint(f"{name}/{domain}", served, domain)
        if not self.endpoints:
            raise UserError(f"{models[0].path}: no expandlm.json saying which domains it serves")
        self.aliases = {}  # a bare domain name, where exactly one model serves it
        for endpoint in self.endpoints.values():
            self.aliases.setdefault(endpoint.domain, []).append(endpoint)
        self.aliases = {d: eps[0] for d, eps in self.aliases.items() if len(eps) == 1}
        self.router = self._router()  # loaded (or trained) once, not per request

    def ids(self) -> list[str]:
        return [*self.endpoints, AUTO]

    def find(self, model_id: str) -> Endpoint | None:
        return self.endpoints.get(model_id) or self.aliases.get(model_id)

    def get(self, model_id: str) -> Endpoint:
        endpoint = self.find(model_id)
        if endpoint is None:
            raise APIError(404, f"The model '{model_id}' does not exist; served: {', '.join(self.ids())}",
                           param="model", code="model_not_found")
        return endpoint

    def _router(self):
        """The first model's own router when it serves every domain served here; else one router over
        the union of the folders' domains, trained at start from each domain's recorded training data
        (the first folder that serves a domain answers it)."""
        domains = list(dict.fromkeys(e.domain for e in self.endpoints.values()))
        if set(domains) <= set(self.models[0].domains):
            return load_router(self.models[0])
        data, declared = {}, {}
        for served in self.models:
            known = served.domain_data()
            for d in served.domains:
                if d not in data and d in known:
                    data[d] = known[d]
                    declared[d] = served.domain(d)
        missing = [d for d in domains if d not in data]
        if missing:
            raise UserError(f"cannot route 'auto' over {', '.join(domains)}: no recorded training data for "
                            f"{', '.join(missing)} (run.json 'domain_data')")
        return routing.router_from_data(data, known=declared)

    def route(self, request: str) -> tuple[Endpoint, Route]:
        """`auto`: the router picks the domain; the first model that serves it answers."""
        try:
            routed = (routing.route(request, self.router) if self.router
                      else route_request(request, self.models[0]))
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None
        endpoint = next(e for e in self.endpoints.values() if e.domain == routed.domain)
        return endpoint, routed


# -- the scheduler ----------------------------------------------------------------------------------

class Busy(Exception):
    """The request queue is full."""


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
    end_ids: frozenset[int] = frozenset()  # tokens that end it as its tokenizer's EOS does (a chat turn's end)
    cancelled: bool = False
    new_tokens: int = 0
    text: str = ""        # generated so far (before any stop string)
    sent: int = 0         # characters of `text` already sent
    last: int = -1        # the last token sampled (-1: none yet)
    done: bool = False    # finished or failed; its slot is free
    _stream: TextStream | None = None
    _stops: StopStrings = field(init=False)

    def __post_init__(self):
        self._stops = StopStrings(self.stops)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


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
            raise APIError(400, f"n is {len(jobs)}, but this server queues at most {self.max_waiting} sequences",
                           param="n")
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
            if job.cancelled:
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
                self._release(job, slot)

    def _next_token(self, job: Job, slot: int, logits: torch.Tensor) -> None:
        token = job.sampler(logits)
        job.last, job.new_tokens = token, job.new_tokens + 1
        tokenizer = job.endpoint.tokenizer
        if (token == tokenizer.eos_token_id or token in job.end_ids) and not job.ignore_eos:
            return self._finish(job, slot, "stop")
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
            job.emit("text", job.text[job.sent:len(job.text) - hold])
            job.sent = len(job.text) - hold
        if job.new_tokens >= job.max_new:
            self._finish(job, slot, "length")

    def _finish(self, job: Job, slot: int, reason: str | None) -> None:
        if reason is not None:
            if len(job.text) > job.sent:
                job.emit("text", job.text[job.sent:])
            job.emit("done", reason, job.new_tokens)
        self._release(job, slot)

    def _release(self, job: Job, slot: int) -> None:
        job.done = True
        with self.lock:
            slots = self.running.get(job.endpoint.id, {})
            if slots.get(slot) is job:
                del slots[slot]


# -- the API ----------------------------------------------------------------------------------------
MAX_BODY_BYTES = 1 << 20  # a request here is a prompt of a few thousand characters: 1 MiB is generous
BODY_TIMEOUT_S = 30.0     # a body that has not arrived whole by then is a client holding a connection
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's and vLLM's bounds
INT64 = (-2**63, 2**63 - 1)  # the seeds vLLM accepts; seed + i (n <= 16) stays within torch's range


def _unicode(text: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer (nor a UTF-8 response) takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                         f"{e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Sampling(BaseModel):
    """The sampling fields of both endpoints (OpenAI's, plus vLLM's top_k). Strict types: "5" is not 5."""
    model_config = ConfigDict(strict=True, extra="ignore")

    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int | None = None  # vLLM's extension; None, 0 or -1: off
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever (for load tests)
    stop: Text | list[Text] | None = Field(None, validate_default=True)  # read as a list (`_stops`)
    seed: Annotated[int, Field(ge=INT64[0], le=INT64[1])] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return [s for s in stops if s]  # "" stops nothing, as in a list (else every answer would be empty)


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = ""


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read, and their `text` is a string."""
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: Text | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text', a string")
        return self


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: their text parts
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]


def chat_prompt(d: Domain, messages: list[Message]) -> str:
    """The chat template of every domain: the last user message, read as a request for that domain,
    becomes the domain's prompt ("a story about a cat" → "Once upon a time, there was a cat.")."""
    user = [m for m in messages if m.role == "user"]
    if not user:
        raise APIError(400, "messages must contain a user message", param="messages")
    return d.prompt(split_request(user[-1].text(), [d]).topic)


def template_ids(endpoint: Endpoint, messages: list[Message]) -> list[int]:
    """The conversation as the tokenizer's own chat template renders it, every message (system and
    assistant ones too) and the assistant's turn opened (`add_generation_prompt`), as vLLM serves it."""
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        rendered = endpoint.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True)
    except TemplateError as e:  # a template may refuse a conversation (raise_exception): the client's to fix
        raise APIError(400, f"The model's chat template refuses these messages: {e}", param="messages") from None
    return list(rendered["input_ids"])


@dataclass
class Plan:
    """A validated request, ready to run: the endpoint, the request ids and the sampling."""
    endpoint: Endpoint
    echoed: str  # what a chat answer's content starts with: the domain prompt it continues, or nothing
    ids: list[int]
    max_new: int
    routed: Route | None = None
    end_ids: frozenset[int] = frozenset()  # tokens that end the answer besides the tokenizer's EOS


def _plan(catalog: Catalog, req: Sampling, text: str, chat: bool) -> Plan:
    """Run in a worker thread (`_completion_routes`): routing and reading a request take time in its
    length, bounded by `routing.MAX_REQUEST_CHARS`. A chat with a domain that has a chat template
    (`Endpoint.chat_template`) is that template's: only tokenized, nothing echoed, ended by a turn's end."""
    param = "messages" if chat else "prompt"
    found = None if req.model == AUTO else catalog.find(req.model)
    templated = chat and found is not None and found.chat_template
    if (req.model == AUTO or chat) and not templated and len(text) > routing.MAX_REQUEST_CHARS:  # read
        raise APIError(400, f"The request is {len(text)} characters; the limit is {routing.MAX_REQUEST_CHARS}",
                       param=param, code="request_too_long")
    routed = None
    if templated:
        endpoint, echoed, ids = found, "", template_ids(found, req.messages)
    else:
        if req.model == AUTO:
            endpoint, routed = catalog.route(text)
            prompt = routed.prompt
        else:
            endpoint = catalog.get(req.model)
            prompt = chat_prompt(endpoint.served.domain(endpoint.domain), req.messages) if chat else text
        ids = request_ids(endpoint.tokenizer, endpoint.served.domain(endpoint.domain), prompt)
        echoed = prompt if chat else ""
    context = endpoint.context
    if len(ids) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt is {len(ids)} "
                       "tokens (with the request's start tokens)", param=param, code="context_length_exceeded")
    asked = req.max_completion_tokens or req.max_tokens
    room = context - len(ids)
    if asked is not None and asked > room:
        raise APIError(400, f"max_tokens is {asked}, but the prompt leaves room for {room} of the model's "
                       f"{context}-token context", param="max_tokens", code="context_length_exceeded")
    return Plan(endpoint, echoed, ids, asked or room, routed, endpoint.end_of_turn if templated else frozenset())


def _routing(plan: Plan) -> dict | None:
    r = plan.routed
    # fits false: no domain fits the request; the best guess still answers, and `reason` says so
    return None if r is None else {"domain": r.domain, "confidence": r.confidence, "scores": r.scores,
                                   "reason": r.reason, "prompt": r.prompt, "fits": r.fits}


class BodyLimits:
    """ASGI middleware: a request body over `max_bytes` is answered 413 (at once when its length is
    declared), and one that has not arrived whole within `timeout_s` of the request's start 408, so a
    client sending a byte now and then cannot hold a connection and a handler for ever (uvicorn bounds
    idle connections, not slow bodies). FastAPI's own `max_body_size` answers 413 in plain text.
    Raised from `receive`, an HTTPException is answered by the app's handler, in OpenAI's shape."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large().response()(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, received, whole = loop.time() + self.timeout_s, 0, False

        async def receive_within_limits():
            nonlocal received, whole
            if whole:  # after the body: a disconnect, which may come any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"The request body did not arrive within {self.timeout_s:g} s") from None
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large().message)
            return message

        await self.app(scope, receive_within_limits, send)

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.max_bytes} bytes", code="413")


def create_app(catalog: Catalog, scheduler: Scheduler, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    app = FastAPI(title="expandlm", version="0.1.0")
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.state.catalog, app.state.scheduler = catalog, scheduler
    _error_handlers(app)
    _info_routes(app, catalog, scheduler)
    _completion_routes(app, catalog, scheduler)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"The request body is not valid JSON: {first.get('msg')}").response()
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return APIError(400, f"Invalid request: {problems}", param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers).response()


def _info_routes(app: FastAPI, catalog: Catalog, scheduler: Scheduler) -> None:
    @app.get("/health")
    def health():
        return {"status": "ok", "models": catalog.ids(), **scheduler.load()}

    @app.get("/v1/models")
    def models():
        created = int(time.time())
        data = [{"id": e.id, "object": "model", "created": created, "owned_by": "expandlm", "domain": e.domain,
                 "context_length": e.context} for e in catalog.endpoints.values()]
        data.append({"id": AUTO, "object": "model", "created": created, "owned_by": "expandlm",
                     "domain": None, "domains": sorted({e.domain for e in catalog.endpoints.values()})})
        return {"object": "list", "data": data}

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _completion_routes(app: FastAPI, catalog: Catalog, scheduler: Scheduler) -> None:
    # Planning (routing, reading and tokenizing the request) runs in a worker thread: it takes time in
    # the request's length, and on the event loop it would hold /health and every stream meanwhile.
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        plan = await run_in_threadpool(_plan, catalog, req, prompt, False)
        return await _answer(scheduler, req, plan, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        last = [m for m in req.messages if m.role == "user"]
        plan = await run_in_threadpool(_plan, catalog, req, last[-1].text() if last else "", True)
        return await _answer(scheduler, req, plan, request, chat=True)


async def _answer(scheduler: Scheduler, req: Sampling, plan: Plan, request: Request, chat: bool):
    loop = asyncio.get_running_loop()
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    jobs = [Job(plan.endpoint, plan.ids, Sampler(req.temperature, top_k, req.top_p, seed + i), plan.max_new,
                req.stop, asyncio.Queue(), loop, ignore_eos=req.ignore_eos, end_ids=plan.end_ids)
            for i in range(req.n)]
    try:
        scheduler.submit(jobs)
    except Busy:
        raise APIError(429, f"The server is busy ({scheduler.max_waiting} requests waiting); retry later",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": plan.endpoint.id}
    if plan.routed:
        head["routing"] = _routing(plan)
    prefix = plan.echoed
    if req.stream:
        return StreamingResponse(_stream(jobs, head, prefix, chat, req.stream_options),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _unless_disconnected(request, _collect(jobs, head, prefix, chat, plan))


async def _unless_disconnected(request: Request, answer):
    """`answer` (a coroutine), abandoned if the client goes away first: cancelled, it cancels its jobs,
    which leave their slots at the next step as a dropped stream's do (FastAPI does not stop a
    handler whose client has gone)."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()  # nothing, if it is done
    if work.cancelled():
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(jobs, head, prefix, chat, plan):
    choices, completion = [], 0
    try:
        for i, job in enumerate(jobs):
            text, reason = prefix, None
            while reason is None:
                kind, *rest = await job.events.get()
                if kind == "text":
                    text += rest[0]
                elif kind == "done":
                    reason, made = rest
                    completion += made
                else:
                    raise APIError(500, rest[0], type="server_error")
            body = {"role": "assistant", "content": text} if chat else None
            choices.append({"index": i, "finish_reason": reason, "logprobs": None,
                            **({"message": body} if chat else {"text": text})})
    finally:
        for job in jobs:
            job.cancelled = True
    usage = {"prompt_tokens": len(plan.ids) * len(jobs), "completion_tokens": completion,
             "total_tokens": len(plan.ids) * len(jobs) + completion}
    return {**head, "choices": choices, "usage": usage}


def _chunk(head: dict, chat: bool, index: int, text=None, reason=None, first=False) -> str:
    """One server-sent event of a streamed answer."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return "data: " + json.dumps({**head, "object": kind, "choices": [choice]}) + "\n\n"


async def _stream(jobs, head, prefix, chat, stream_options):
    completion = 0
    try:
        for i in range(len(jobs)):
            yield _chunk(head, chat, i, prefix, first=True)
        pending = {i: asyncio.ensure_future(job.events.get()) for i, job in enumerate(jobs)}
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i, fut in list(pending.items()):
                if fut not in done:
                    continue
                events = [fut.result()]
                while not jobs[i].events.empty():  # the client fell behind: one chunk for all it missed
                    events.append(jobs[i].events.get_nowait())
                text = "".join(e[1] for e in events if e[0] == "text")
                if text:
                    yield _chunk(head, chat, i, text)
                kind, *rest = events[-1]  # "done" and "error" are a job's last event
                if kind == "text":
                    pending[i] = asyncio.ensure_future(jobs[i].events.get())
                elif kind == "done":
                    completion += rest[1]
                    yield _chunk(head, chat, i, None if chat else "", rest[0])
                    del pending[i]
                else:
                    err = {"error": {"message": rest[0], "type": "server_error", "param": None, "code": None}}
                    yield "data: " + json.dumps(err) + "\n\n"
                    del pending[i]
        if (stream_options or {}).get("include_usage"):
            prompt = len(jobs[0].ids) * len(jobs)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client went away: free the slots at the next step
        for job in jobs:
            job.cancelled = True


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, engine: str = "fast", max_batch: int = 8,
          max_waiting: int = 64, threads: int | None = None, base_domain: str = BASE_DOMAIN) -> None:
    import uvicorn
    from .http import header_timed

    opened = {}  # folders built on one base share it: its weights are held once
    catalog = Catalog([load_served(p, base_domain=base_domain, opened=opened) for p in paths])
    scheduler = Scheduler(engine, max_batch, max_waiting, threads)
    scheduler.prepare(catalog.endpoints.values())
    scheduler.start()
    for model_id in catalog.ids():
        print(f"serving {model_id}")
    print(f"OpenAI-compatible API at http://{host}:{port}/v1 · web page at http://{host}:{port}/")
    try:
        uvicorn.run(create_app(catalog, scheduler), host=host, port=port, log_level="warning", http=header_timed())
    finally:
        scheduler.stop()
