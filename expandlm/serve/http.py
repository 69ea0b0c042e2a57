"""The server's HTTP layer: what a connection and a request may cost, and who may make one.

- `header_timed`: uvicorn's h11 protocol with a deadline for a request's headers. uvicorn bounds the idle
  time between requests (keep-alive) but not a request whose headers never finish: a client that sent
  half a header and then nothing held its connection for ever. As nginx's `client_header_timeout` does, a
  connection whose request headers have not arrived whole within `HEADER_TIMEOUT_S` of its start (or of
  the previous answer) is closed. Hand-written because uvicorn has no such setting.
- `BodyLimits`: a body's size (413) and the time it may take to arrive (408).
- `BearerAuth`: with `--api-key`, `/v1/*` needs `Authorization: Bearer KEY` (401), as vLLM's does.

    uvicorn.run(app, http=header_timed(10.0))
    app.add_middleware(BearerAuth, keys=("sk-...",))
"""
from __future__ import annotations

import asyncio
import secrets

import h11
from fastapi import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

HEADER_TIMEOUT_S = 30.0  # as the body's: a header that has not arrived whole by then is a client holding a connection
MAX_BODY_BYTES = 1 << 20  # a request here is a prompt of a few thousand characters: 1 MiB is generous
BODY_TIMEOUT_S = 30.0     # a body that has not arrived whole by then is a client holding a connection


def header_timed(timeout_s: float = HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers take longer than `timeout_s`."""

    class HeaderTimedH11(H11Protocol):
        header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in: its body has its own deadline
                self._cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
                self._await_headers()

        def connection_lost(self, exc) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self._cancel()
            self.header_deadline = self.loop.call_later(timeout_s, self._headers_too_late)

        def _cancel(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def _headers_too_late(self) -> None:
            self.header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimedH11


class BearerAuth:
    """ASGI middleware: with API keys set, every `/v1/*` request needs `Authorization: Bearer KEY` with one
    of them, or is answered 401 in OpenAI's shape; `/health` and the page stay open, as in vLLM's
    `--api-key`. Checked before the body is read, so a client without a key costs no upload."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, tuple(k.encode() for k in keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = given.partition(b" ")
        # compare_digest with every key: the time taken says nothing of how much of a key was right
        if scheme.lower() == b"bearer" and sum(secrets.compare_digest(key.strip(), k) for k in self.keys):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                   "(Authorization: Bearer YOUR_KEY); the server's key is its --api-key or EXPANDLM_API_KEY.")
        error = APIError(401, message, code="invalid_api_key" if given else None,
                         headers={"WWW-Authenticate": "Bearer"})
        return await error.response()(scope, receive, send)


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
