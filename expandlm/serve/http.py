"""The server's HTTP connections: uvicorn's h11 protocol, with a deadline for a request's headers.

uvicorn bounds the idle time between requests (keep-alive) but not a request whose headers never finish:
a client that sends half a header and then nothing held its connection for ever (issue 30). As nginx's
`client_header_timeout` does, a connection whose request headers have not arrived whole within
`HEADER_TIMEOUT_S` of its start (or of the previous answer) is closed. The body has its own deadline
(`app.BodyLimits`, a 408). Hand-written because uvicorn has no such setting.

    uvicorn.run(app, http=header_timed(10.0))
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 30.0  # as the body's: a header that has not arrived whole by then is a client holding a connection


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
