"""What stands between the network and the server's routes: body size and read deadline, API key, disconnects,
and the header deadline of the HTTP protocol itself.

Plain ASGI and uvicorn protocol hooks, no FastAPI. It never reads or buffers a body: it counts and times what a
route reads, so a limit holds while the body streams in (chunked bodies included), before it is all in memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ServeError

log = logging.getLogger("luodi.serve")

MiB = 1024 * 1024


class PayloadTooLargeError(ServeError):
    """A request body is larger than the server's --max-body-mb (HTTP 413)."""


class BodyTimeoutError(ServeError):
    """A request body did not arrive within the server's --body-timeout-s (HTTP 408)."""


class UnauthorizedError(ServeError):
    """A request without the server's API key on a route that needs it (HTTP 401)."""


class ClientGone(Exception):
    """The client closed the connection before its body was read: nobody is left to answer."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost. The defaults fit any model luodi serves; lower them where the
    inputs are small (an int8 keyword spotter needs kilobytes, not 64 MiB)."""

    max_body_bytes: int = 64 * MiB
    """413 above this: measured, JSON inputs cost about 9x their body size while decoded."""
    max_image_pixels: int = 40_000_000
    """400 above this (width x height, read from the image header before decoding): 40 MP is an 8000x5000
    photo, 120 MB as decoded RGB; the 89 MP Pillow allows by default cost 0.75 GB per request."""
    body_timeout_s: float = 60.0
    """408 when the whole body has not arrived this long after its headers (a client sending 1 byte a second)."""
    header_timeout_s: float = 10.0
    """The connection is closed when a request's headers have not all arrived this long after its first byte."""
    max_header_bytes: int = 64 * 1024
    """Request line and headers together; above it the connection gets a 400 and is closed."""


@dataclass(frozen=True)
class Access:
    """Who may call what. With ``api_key`` set, model control needs it always, everything else but health
    needs it unless ``public_inference``; ``read_only`` removes the model-control routes altogether."""

    api_key: str | None = None
    public_inference: bool = False
    read_only: bool = False


_HEADERS, _BODY, _UNTIMED = 0, 1, 2  # what a connection is waiting for, in the protocol's watchdog
_KEEP_ALIVE_LATE_S = 0.05  # a keep-alive timer this late means the loop stalled (see timeout_keep_alive_handler)
_BODY_DEADLINE = "luodi.body_deadline"  # a scope extension: the HTTP protocol below times the body itself
# A scope extension: the server's requests in flight (uvicorn's set of request tasks, this one's included, from the
# moment a request's headers are in), so a route can tell that it is alone without yielding to the loop to find out.
REQUESTS_IN_FLIGHT = "luodi.requests_in_flight"

# Routes a load balancer or orchestrator probes, and the page (static HTML that asks for the key): never behind
# the key, as they say nothing about the models.
_ALWAYS_OPEN = ("/v2/health/live", "/v2/health/ready", "/")
_CONTROL_PREFIX = "/v2/repository"


def kserve_error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    """The start and body messages of a KServe v2 error answer ({"error": ...})."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, body


class Guard:
    """ASGI middleware: API key, body size and body read deadline, and client disconnects as one log line."""

    def __init__(self, app: Any, limits: Limits, access: Access) -> None:
        self.app, self.limits, self.access = app, limits, access
        self._key = access.api_key.encode() if access.api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refused = self._refuse(scope, headers)
        if refused is not None:
            client = scope.get("client") or ("", 0)
            log.info(
                "refused",
                extra={"event": "refused", "status": refused[0], "path": scope.get("path", ""), "client": client[0]},
            )
            await _answer(send, *refused)
            return
        # Under `luodi serve` the HTTP protocol times the body (its watchdog); elsewhere (another ASGI server,
        # a test client) this middleware does, at the price of a timer per receive (15 us a request).
        timed = _BODY_DEADLINE not in scope.get("extensions", ())
        try:
            await self.app(scope, self._receive(receive, timed), send)
        except ClientGone:
            # One line, not an ASGI traceback: a client that hangs up mid-upload is the network's weather.
            log.info("client disconnected", extra={"event": "disconnect", "path": scope.get("path", "")})

    def _refuse(self, scope: dict, headers: dict[bytes, bytes]) -> tuple[int, str, dict[str, str]] | None:
        """An answer given before the route runs: missing key, or a declared length over the limit."""
        path = scope.get("path", "")
        if self._key is not None and path not in _ALWAYS_OPEN:
            needs_key = path.startswith(_CONTROL_PREFIX) or not self.access.public_inference
            if needs_key and not self._authorized(headers):
                return (
                    401,
                    "this server needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                    {"WWW-Authenticate": 'Bearer realm="luodi"'},
                )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return 413, _too_large(int(declared), self.limits.max_body_bytes), {"Connection": "close"}
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self._key is not None
        given = headers.get(b"x-api-key")
        if given is None:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            given = token.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(given, self._key)  # constant time: the key cannot be guessed byte by byte

    def _receive(self, receive: Any, timed: bool) -> Any:
        limit, budget = self.limits.max_body_bytes, self.limits.body_timeout_s
        start = asyncio.get_running_loop().time() if timed else float("-inf")  # the loop's clock (uvloop's too)
        state = {"seen": 0, "deadline": start + budget, "done": False}

        async def guarded() -> dict:
            try:
                message = await (receive() if state["done"] or not timed else _within(receive(), state["deadline"]))
            except asyncio.TimeoutError:
                raise BodyTimeoutError(
                    f"the request body did not arrive within {budget:g} s; send it faster or in a smaller request"
                ) from None
            if message["type"] == "http.disconnect" and not state["done"]:
                raise ClientGone()  # mid-body; once the body is in, a disconnect is the route's business
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    raise PayloadTooLargeError(_too_large(state["seen"], limit, streaming=message.get("more_body")))
                if not message.get("more_body"):
                    state["done"] = True  # the body is in: the route's own waits are not ours to time
            return message

        return guarded


if sys.version_info >= (3, 11):

    async def _within(awaitable: Any, deadline: float) -> Any:
        """``await awaitable``, or TimeoutError at ``deadline`` (on the running loop's clock)."""
        async with asyncio.timeout_at(deadline):  # a timer, not a task per receive as wait_for makes
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def _within(awaitable: Any, deadline: float) -> Any:
        left = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(awaitable, max(left, 0.001))


def _too_large(size: int, limit: int, streaming: bool = False) -> str:
    got = f"more than {limit} bytes so far" if streaming else f"{size} bytes"
    return (
        f"the request body is too large ({got}; this server takes at most {limit / MiB:g} MiB, --max-body-mb): "
        "send fewer or smaller inputs per request, or binary tensors instead of JSON"
    )


def _headers(scope: dict) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


async def _answer(send: Any, status: int, message: str, headers: dict[str, str]) -> None:
    start, body = kserve_error(status, message, headers)
    await send(start)
    await send({"type": "http.response.body", "body": body})


def _late(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


_LATE_HEADERS = _late("the request headers did not arrive in time; the connection is closed")
_LATE_BODY_ANSWER = _late(
    "the request body did not arrive in time (--body-timeout-s); send it faster or in a smaller request"
)


def guarded_http_protocol(limits: Limits) -> Any:
    """uvicorn's httptools protocol with a header deadline and size: uvicorn times out idle keep-alive
    connections but not a request whose headers trickle in (1 byte every 2 s held a connection for as long as
    the client liked), and llhttp bounds neither the headers' count nor their size. None when httptools is not
    installed (uvicorn then runs h11, whose own limit is on header size only)."""
    header_timeout_s, max_header_bytes = limits.header_timeout_s, limits.max_header_bytes
    body_timeout_s = limits.body_timeout_s
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        """One watchdog timer per connection, not two timers per request: each request only notes its phase
        (headers since t, body since t, or nothing to time) and the watchdog, when it wakes, closes a
        connection whose phase has outlived its deadline or sleeps until the earliest one it could."""

        _watchdog: asyncio.TimerHandle | None = None
        _phase = _HEADERS
        _since = 0.0
        _header_bytes = 0

        def connection_made(self, transport: Any) -> None:  # a connection that never sends is cut too
            super().connection_made(transport)
            self._enter(_HEADERS)
            self._watchdog = self.loop.call_later(header_timeout_s, self._watch)

        def timeout_keep_alive_handler(self) -> None:
            # uvicorn closes a keep-alive connection when it has been idle timeout_keep_alive seconds. Under uvloop
            # (libuv) a loop that stalled inside an I/O callback (a large body's decode holding the GIL) runs its due
            # timers before it reads the sockets again, so a request the client sent in time on this connection
            # found it closed without an answer. A timer that fires late therefore looks again once the loop has
            # read what came in (data_received cancels the look, as it cancels the timer).
            timer = self.timeout_keep_alive_task
            if timer is not None and self.loop.time() - timer.when() > _KEEP_ALIVE_LATE_S:
                self.timeout_keep_alive_task = self.loop.call_later(0.001, self.timeout_keep_alive_handler)
                return
            super().timeout_keep_alive_handler()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {_BODY_DEADLINE: {}, REQUESTS_IN_FLIGHT: self.tasks}
            self._header_bytes = 0
            self._enter(_HEADERS)

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > max_header_bytes:
                # raised inside a parser callback, uvicorn answers 400 "Invalid HTTP request" and closes
                raise ValueError(f"request headers over {max_header_bytes} bytes")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._enter(_BODY)

        def on_message_complete(self) -> None:
            self._enter(_UNTIMED)  # the route's time is the batcher's and the request timeout's business
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            super().connection_lost(exc)

        def _enter(self, phase: int) -> None:
            self._phase, self._since = phase, self.loop.time()

        def _watch(self) -> None:
            self._watchdog = None
            if self.transport.is_closing():
                return
            limit = header_timeout_s if self._phase == _HEADERS else body_timeout_s
            left = self._since + limit - self.loop.time()
            if self._phase != _UNTIMED and left <= 0:
                self._late()
                return
            delay = left if self._phase != _UNTIMED else min(header_timeout_s, body_timeout_s)
            self._watchdog = self.loop.call_later(max(delay, 0.01), self._watch)

        def _late(self) -> None:
            cycle = self.cycle if self._phase == _BODY else None
            if self._phase == _HEADERS:
                self.transport.write(_LATE_HEADERS)
            else:
                path = self.scope.get("path", "")
                log.info("request body too slow", extra={"event": "body_timeout", "path": path})
                if cycle is not None and not cycle.response_started:
                    self.transport.write(_LATE_BODY_ANSWER)
            self.transport.close()  # a route still reading gets a disconnect; its sends are dropped

    return HeaderDeadlineProtocol
