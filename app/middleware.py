"""The one middleware: body limits (size, stalls, disconnects) and request metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.memory import RequestCounter
from app.observability import Metrics

log = logging.getLogger("imgsim.app")
CLOSE = {"Connection": "close"}  # the rest of the body is never read: the connection cannot be reused
SHUTTING_DOWN = "the service is shutting down; retry shortly"
CLIENT_GONE = 499  # nginx's code for "the client closed the request": in the metrics, never sent


# Which process answered: behind a load balancer or Ray Serve's proxy, which replica it was.
PROCESS_HEADER = (b"x-imgsim-process", f"{socket.gethostname()}:{os.getpid()}".encode())


class BodyGuard:
    """The app's ``receive``: counts the body, stops it at the size limit or when it stalls,
    and notices a client that hangs up before sending it all."""

    def __init__(self, receive: Receive, limit: int, too_large: str, stall_seconds: float) -> None:
        self._receive = receive
        self.limit, self.too_large, self.stall_seconds = limit, too_large, stall_seconds
        self.received = 0
        self.complete = False
        self.disconnected = False

    async def __call__(self) -> Message:
        if self.complete:  # later calls wait for a disconnect: no deadline
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self.stall_seconds)
        except TimeoutError:  # FastAPI passes an HTTPException raised while it reads on as it is
            raise HTTPException(408, f"request body stalled for {self.stall_seconds:g} s", CLOSE) from None
        if message["type"] == "http.disconnect":
            self.disconnected = True
            return message
        self.complete = not message.get("more_body", False)
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            raise HTTPException(413, self.too_large, CLOSE)
        return message


class ObserveMiddleware:
    """The body limit, request count and latency per endpoint and model.

    A body over the limit gets 413: at once when its Content-Length says so, otherwise as
    soon as the bytes read pass the limit (chunked bodies too), before any route reads it
    whole, parses it or checks an API key. A body that stalls for IMGSIM_BODY_SECONDS gets
    408, and a client that hangs up mid-upload costs one INFO line (499 in the metrics). A
    request still running when the shutdown deadline cancels it gets 503 and one INFO line
    (uvicorn would log a traceback and answer 500).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (``@app.middleware``) costs a
    measurable share of the per-request time of a fast model.
    """

    def __init__(
        self, app: ASGIApp, metrics: Metrics, requests: RequestCounter, max_upload: int, body_seconds: float
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.requests = requests
        self.body_seconds = body_seconds
        self.limit = max_upload + 64 * 1024  # multipart framing overhead
        self.too_large = f"upload larger than the {max_upload}-byte limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["start"] = start  # where a request's Server-Timing starts
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", ()), PROCESS_HEADER]
            await send(message)

        body = BodyGuard(receive, self.limit, self.too_large, self.body_seconds)
        length = dict(scope["headers"]).get(b"content-length", b"")
        token = self.requests.enter()
        try:
            if length.isdigit() and int(length) > self.limit:
                await JSONResponse({"detail": self.too_large}, 413, CLOSE)(scope, receive, send_status)
            else:
                await self.app(scope, body, send_status)
        except ClientDisconnect:  # raised where a route reads the body itself
            body.disconnected = True
        except asyncio.CancelledError:  # uvicorn cancels what is left when IMGSIM_SHUTDOWN_SECONDS runs out
            log.info("request cut by the shutdown deadline: %s %s", scope["method"], scope["path"])
            if not started:  # else uvicorn closes the connection: a half-sent answer cannot be replaced
                await JSONResponse({"detail": SHUTTING_DOWN}, 503, CLOSE)(scope, receive, send_status)
        finally:
            self.requests.exit(token)
        if body.disconnected:  # nobody to answer, nothing to fix: one line, not a traceback
            status = CLIENT_GONE
            log.info("client disconnected: %s %s after %d body bytes", scope["method"], scope["path"], body.received)
        endpoint = getattr(scope.get("route"), "path", "unmatched")
        model = scope.get("state", {}).get("model", "")
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - start)
