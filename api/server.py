"""The HTTP server: uvicorn, with a timeout for a request head that never completes.

uvicorn (0.54) closes an idle keep-alive connection after --timeout-keep-alive, but it cancels that
timer at the first byte of the next request and has no timer at all before a connection's first
request: a client that sends part of a head ("GET / HTTP/1.1\r\nHost: x\r\n" and no blank line), or
nothing, holds its socket for ever (three such connections were still open after 75 s; h11's
--h11-max-incomplete-event-size bounds the head's size, not its time). The protocols here are
uvicorn's own (httptools where installed, as uvicorn's "auto" picks, else h11) with one more timer:
from the connection's start, and from each response's end, the next head must be complete within
HEAD_TIMEOUT_SECONDS, or the connection is closed as uvicorn closes an idle one.

`fastapi dev` and `fastapi run` cannot be given a protocol, so `python main.py` runs this server,
and `uvicorn main:app --http api.server:HeadTimeoutProtocol` uses it under uvicorn's own command.
Knows nothing of the app's routes: it is handed the app.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util

from uvicorn.protocols.http.h11_impl import H11Protocol

from config import get_settings


class _HeadTimeout:
    """Mixed into a uvicorn HTTP protocol: close the connection when a head is awaited for longer than
    HEAD_TIMEOUT_SECONDS (before the first request, and between requests)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        """No request is being answered: a head is what the connection waits for (a pipelined request
        the response's end started is being answered)."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = None
        if not self.transport.is_closing() and self._awaiting_head():
            self._head_timer = self.loop.call_later(get_settings().HEAD_TIMEOUT_SECONDS, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head():  # else the head came in time and its request is being answered
            self.timeout_keep_alive_handler()  # uvicorn's own close of a connection that sends no request


class HeadTimeoutH11(_HeadTimeout, H11Protocol):
    pass


if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadTimeoutHttpTools(_HeadTimeout, HttpToolsProtocol):
        pass

    HeadTimeoutProtocol: type = HeadTimeoutHttpTools
else:
    HeadTimeoutProtocol = HeadTimeoutH11


def run(app, argv: list[str] | None = None) -> None:
    """`python main.py [--host 127.0.0.1] [--port 8000] [--http h11]`: the app under uvicorn with the head timeout."""
    import uvicorn

    parser = argparse.ArgumentParser(description="Serve persona-lora (uvicorn, closing half-sent requests).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--http", choices=("auto", "h11"), default="auto",
                        help="HTTP parser: httptools where installed (auto), or h11")
    ns = parser.parse_args(argv)
    uvicorn.run(app, host=ns.host, port=ns.port, http=HeadTimeoutH11 if ns.http == "h11" else HeadTimeoutProtocol)
