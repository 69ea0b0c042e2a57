"""`expandlm serve`: the OpenAI-compatible HTTP API (as vLLM, llama.cpp's server and TGI offer it) and a
web page, over one or more model folders.

The parts, one job each (as vLLM's `entrypoints/openai/` splits them):
- `catalog`: the served models and their domains, by model id, and `auto`, which routes a request;
- `scheduler`: the worker thread that decodes every admitted sequence, continuously batched;
- `protocol`: the request models (pydantic) and OpenAI's error shape;
- `http`: what a connection and a request may cost (a header deadline, the body's size and deadline)
  and who may make one (`--api-key`);
- this module: the FastAPI app, turning a request into a plan (`_plan`: its endpoint, its ids, its
  length) and answering it whole or as server-sent events ending in `data: [DONE]`. A request that is
  read (routed, or a chat made a domain's prompt by `chat_prompt`) is read in a worker thread, off the
  event loop, and bounded by `routing.MAX_REQUEST_CHARS`. A plain domain whose tokenizer has a chat
  template (an instruct checkpoint's) renders a chat with it, and its turn's end stops it, as in vLLM.

    serve(["runs/demo/+recipes"], port=8000, api_keys=("sk-...",))
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..domains import Domain
from ..formats.checkpoint import BASE_DOMAIN
from ..formats.served import load_served
from ..inference.engine import Sampler
from ..inference.generate import request_ids
from ..routing import router as routing
from ..routing.router import Route, split_request
from .catalog import AUTO, Catalog, Endpoint
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .http import BODY_TIMEOUT_S, MAX_BODY_BYTES, BearerAuth, BodyLimits
from .protocol import APIError, ChatRequest, CompletionRequest, Message, Sampling, logprobs_object, readable_problems
from .scheduler import Busy, Job, Scheduler

STATIC = Path(__file__).parent / "static"


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


def _plan(catalog: Catalog, req: Sampling, prompt: str | list[int], chat: bool) -> Plan:
    """Run in a worker thread (`_completion_routes`): routing and reading a request take time in its
    length, bounded by `routing.MAX_REQUEST_CHARS`. A chat with a domain that has a chat template
    (`Endpoint.chat_template`) is that template's: only tokenized, nothing echoed, ended by a turn's end.
    A prompt of token ids is taken as it is (no request tokens added, as vLLM takes them)."""
    param = "messages" if chat else "prompt"
    if isinstance(prompt, list):
        if req.model == AUTO:
            raise APIError(400, f"'{AUTO}' routes a request by its text: send text, or name a model for token ids",
                           param="prompt")
        endpoint = catalog.get(req.model)
        if (bad := max(prompt)) >= endpoint.vocab_size:
            raise APIError(400, f"Token id {bad} is outside the vocabulary of '{endpoint.id}' (ids 0 to "
                           f"{endpoint.vocab_size - 1})", param="prompt")
        return _bounded(req, Plan(endpoint, "", prompt, 0), param)
    found = None if req.model == AUTO else catalog.find(req.model)
    templated = chat and found is not None and found.chat_template
    if (req.model == AUTO or chat) and not templated and len(prompt) > routing.MAX_REQUEST_CHARS:  # read
        raise APIError(400, f"The request is {len(prompt)} characters; the limit is {routing.MAX_REQUEST_CHARS}",
                       param=param, code="request_too_long")
    if templated:
        return _bounded(req, Plan(found, "", template_ids(found, req.messages), 0, end_ids=found.end_of_turn), param)
    routed = None
    if req.model == AUTO:
        endpoint, routed = catalog.route(prompt)
        prompt = routed.prompt
    else:
        endpoint = catalog.get(req.model)
        prompt = chat_prompt(endpoint.served.domain(endpoint.domain), req.messages) if chat else prompt
    ids = request_ids(endpoint.tokenizer, endpoint.served.domain(endpoint.domain), prompt)
    return _bounded(req, Plan(endpoint, prompt if chat else "", ids, 0, routed), param)


def _bounded(req: Sampling, plan: Plan, param: str) -> Plan:
    """The plan with its answer's length: what max_tokens asks, or all the context leaves; 400 where the
    prompt, or the prompt and max_tokens, do not fit the context."""
    context = plan.endpoint.context
    if len(plan.ids) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt is "
                       f"{len(plan.ids)} tokens (with the request's start tokens)", param=param,
                       code="context_length_exceeded")
    asked = req.max_completion_tokens or req.max_tokens
    room = context - len(plan.ids)
    if asked is not None and asked > room:
        raise APIError(400, f"max_tokens is {asked}, but the prompt leaves room for {room} of the model's "
                       f"{context}-token context", param="max_tokens", code="context_length_exceeded")
    plan.max_new = asked or room
    return plan


def _routing(plan: Plan) -> dict | None:
    r = plan.routed
    # fits false: no domain fits the request; the best guess still answers, and `reason` says so
    return None if r is None else {"domain": r.domain, "confidence": r.confidence, "scores": r.scores,
                                   "reason": r.reason, "prompt": r.prompt, "fits": r.fits}


def create_app(catalog: Catalog, scheduler: Scheduler, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S, api_keys: tuple[str, ...] = ()) -> FastAPI:
    """The app; with `api_keys`, `/v1/*` answers only requests that bear one of them."""
    app = FastAPI(title="expandlm", version="0.1.0")
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if api_keys:  # added last, so it runs first: a request without a key is refused before its body is read
        app.add_middleware(BearerAuth, keys=tuple(api_keys))
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
        if first.get("type") == "json_invalid":
            return APIError(400, f"The request body is not valid JSON: {first.get('msg')}").response()
        problems = readable_problems(exc.errors())
        return APIError(400, "Invalid request: " + "; ".join(f"{f or 'body'}: {m}" for f, m in problems),
                        param=problems[0][0] or None).response()

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
        def card(model_id: str, e: Endpoint) -> dict:
            return {"id": model_id, "object": "model", "created": created, "owned_by": "expandlm",
                    "root": str(e.served.path), "domain": e.domain, "context_length": e.context}

        data = [card(e.id, e) for e in catalog.endpoints.values()]
        # the bare domain names that work as ids, listed as vLLM lists every id it answers
        data += [{**card(alias, e), "alias_of": e.id} for alias, e in catalog.aliases.items()
                 if alias not in catalog.endpoints]
        data.append({"id": AUTO, "object": "model", "created": created, "owned_by": "expandlm",
                     "domain": None, "domains": sorted({e.domain for e in catalog.endpoints.values()})})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    def metrics():  # open, as /health is (vLLM's --api-key guards /v1 only)
        return Response(scheduler.metrics.render(), media_type=METRICS_TYPE)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")


def _completion_routes(app: FastAPI, catalog: Catalog, scheduler: Scheduler) -> None:
    # Planning (routing, reading and tokenizing the request) runs in a worker thread: it takes time in
    # the request's length, and on the event loop it would hold /health and every stream meanwhile.
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = req.prompts()
        if req.model == AUTO and len(prompts) > 1:
            raise APIError(400, f"'{AUTO}' routes one request: send one prompt, or name a model", param="prompt")
        plans = [await run_in_threadpool(_plan, catalog, req, prompt, False) for prompt in prompts]
        return await _answer(scheduler, req, plans, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        last = [m for m in req.messages if m.role == "user"]
        plan = await run_in_threadpool(_plan, catalog, req, last[-1].text() if last else "", True)
        return await _answer(scheduler, req, [plan], request, chat=True)


async def _answer(scheduler: Scheduler, req: Sampling, plans: list[Plan], request: Request, chat: bool):
    """The plans' n choices each (choice p·n + i: prompt p's i-th), whole or streamed."""
    loop = asyncio.get_running_loop()
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    jobs = [Job(plan.endpoint, plan.ids, Sampler(req.temperature, top_k, req.top_p, seed + i), plan.max_new,
                req.stop, asyncio.Queue(), loop, ignore_eos=req.ignore_eos, end_ids=plan.end_ids,
                logprobs=req.alternatives())
            for plan in plans for i in range(req.n)]
    try:
        scheduler.submit(jobs)
    except Busy:
        raise APIError(429, f"The server is busy ({scheduler.max_waiting} requests waiting); retry later",
                       type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": plans[0].endpoint.id}
    if plans[0].routed:
        head["routing"] = _routing(plans[0])
    prefixes = [plan.echoed for plan in plans for _ in range(req.n)]
    if req.stream:
        return StreamingResponse(_stream(jobs, prefixes, head, chat, req.stream_options),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _unless_disconnected(request, _collect(jobs, prefixes, head, chat))


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


def _usage(jobs: list[Job], completion: int) -> dict:
    prompt = sum(len(job.ids) for job in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(jobs: list[Job], prefixes: list[str], head: dict, chat: bool) -> dict:
    choices, completion = [], 0
    try:
        for i, (job, prefix) in enumerate(zip(jobs, prefixes)):
            text, reason, entries = prefix, None, []
            while reason is None:
                kind, *rest = await job.events.get()
                if kind == "text":
                    text += rest[0]
                    entries += rest[1]
                elif kind == "done":
                    reason, made = rest
                    completion += made
                else:
                    raise APIError(500, rest[0], type="server_error")
            logprobs = (None if job.logprobs is None
                        else logprobs_object(entries, job.endpoint.tokenizer, chat, len(prefix))[0])
            body = {"role": "assistant", "content": text} if chat else None
            choices.append({"index": i, "finish_reason": reason, "logprobs": logprobs,
                            **({"message": body} if chat else {"text": text})})
    finally:
        for job in jobs:
            job.cancelled = True
    return {**head, "choices": choices, "usage": _usage(jobs, completion)}


def _chunk(head: dict, chat: bool, index: int, text=None, reason=None, first=False, logprobs=None) -> str:
    """One server-sent event of a streamed answer."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return "data: " + json.dumps({**head, "object": kind, "choices": [choice]}) + "\n\n"


async def _stream(jobs: list[Job], prefixes: list[str], head: dict, chat: bool, stream_options):
    completion = 0
    offsets = [len(prefix) for prefix in prefixes]  # where each choice's next token starts in its text
    try:
        for i, prefix in enumerate(prefixes):
            yield _chunk(head, chat, i, prefix, first=True)
        pending = {i: asyncio.ensure_future(job.events.get()) for i, job in enumerate(jobs)}
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i, fut in list(pending.items()):
                if fut not in done:
                    continue
                job, events = jobs[i], [fut.result()]
                while not job.events.empty():  # the client fell behind: one chunk for all it missed
                    events.append(job.events.get_nowait())
                texts = [e for e in events if e[0] == "text"]
                if texts:
                    logprobs = None
                    if job.logprobs is not None:
                        logprobs, offsets[i] = logprobs_object([t for e in texts for t in e[2]], job.endpoint.tokenizer,
                                                               chat, offsets[i])
                    yield _chunk(head, chat, i, "".join(e[1] for e in texts), logprobs=logprobs)
                kind, *rest = events[-1]  # "done" and "error" are a job's last event
                if kind == "text":
                    pending[i] = asyncio.ensure_future(job.events.get())
                elif kind == "done":
                    completion += rest[1]
                    yield _chunk(head, chat, i, None if chat else "", rest[0])
                    del pending[i]
                else:
                    err = {"error": {"message": rest[0], "type": "server_error", "param": None, "code": None}}
                    yield "data: " + json.dumps(err) + "\n\n"
                    del pending[i]
        if (stream_options or {}).get("include_usage"):
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield "data: " + json.dumps({**head, "object": kind, "choices": [], "usage": _usage(jobs, completion)}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client went away: free the slots at the next step
        for job in jobs:
            job.cancelled = True


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8000, engine: str = "fast", max_batch: int = 8,
          max_waiting: int = 64, threads: int | None = None, base_domain: str = BASE_DOMAIN,
          api_keys: tuple[str, ...] = (), names: list[str] | None = None) -> None:
    import uvicorn
    from .http import header_timed

    opened = {}  # folders built on one base share it: its weights are held once
    catalog = Catalog([load_served(p, base_domain=base_domain, opened=opened) for p in paths], names)
    scheduler = Scheduler(engine, max_batch, max_waiting, threads)
    scheduler.prepare(catalog.endpoints.values())
    scheduler.start()
    for model_id in catalog.ids():
        alias = catalog.aliases.get(model_id)
        print(f"serving {model_id}" + (f" (= {alias.id})" if alias and alias.id != model_id else ""))
    print(f"OpenAI-compatible API at http://{host}:{port}/v1 · web page at http://{host}:{port}/"
          + (f" · /v1 needs one of {len(api_keys)} API key(s) (Authorization: Bearer)" if api_keys else ""))
    try:
        uvicorn.run(create_app(catalog, scheduler, api_keys=api_keys), host=host, port=port, log_level="warning", http=header_timed())
    finally:
        scheduler.stop()
