"""The HTTP edge over real sockets: header limits, idle and slow clients, malformed HTTP,
disconnects mid-upload, and shutdown with a slow uploader still connected."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_api_collection import _serve
from tests.test_service import png

HEADER_SECONDS = 0.5
BODY_SECONDS = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(service_pairs: list[Any]) -> Iterator[tuple[str, int]]:
    """Model ``a`` behind uvicorn with the guarded protocol, in a thread: (host, port)."""
    import uvicorn

    from app.config import ServiceSettings
    from app.main import create_app
    from app.server import guarded_protocol

    settings = ServiceSettings(models=service_pairs[:1], body_seconds=BODY_SECONDS, reload_seconds=0)
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        port=port,
        log_level="info",
        http=guarded_protocol(16 * 1024, HEADER_SECONDS),
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.1)
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(30)


def exchange(addr: tuple[str, int], data: bytes, wait: float = 0.0, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``data``, pause ``wait`` s, then read until the server closes: (answer, seconds to close)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        start = time.monotonic()
        s.sendall(data)
        time.sleep(wait)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - start


def status_and_detail(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body)["detail"]


def healthz_ms(addr: tuple[str, int], tries: int = 3) -> float:
    """The fastest of a few /healthz calls: one call can lose the CPU on a busy machine (or the
    GIL to a sending thread in this process); a server whose loop is blocked makes all of them slow."""
    times = []
    for _ in range(tries):
        start = time.monotonic()
        assert httpx.get(f"http://{addr[0]}:{addr[1]}/healthz").status_code == 200
        times.append((time.monotonic() - start) * 1000)
    return min(times)


def test_huge_headers_get_431_without_stalling_others(server: tuple[str, int]) -> None:
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000_000 + b"\r\n\r\n"
    done: list[bytes] = []
    sender = threading.Thread(target=lambda: done.append(_send_ignoring_reset(server, big)))
    sender.start()
    time.sleep(0.05)
    assert healthz_ms(server) < 100  # the event loop is not busy with the big header
    sender.join(30)
    status, detail = status_and_detail(done[0])
    assert status == 431 and "16384 bytes" in detail


def _send_ignoring_reset(addr: tuple[str, int], data: bytes) -> bytes:
    """The server answers and closes while we still send: read what it said."""
    with socket.create_connection(addr, timeout=10) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return s.recv(65536)


def test_silent_connections_are_closed(server: tuple[str, int]) -> None:
    answer, seconds = exchange(server, b"")
    assert answer == b"" and HEADER_SECONDS - 0.1 <= seconds < HEADER_SECONDS + 2, seconds  # timer starts at accept


def test_dripping_headers_get_408(server: tuple[str, int]) -> None:
    answer, seconds = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    status, detail = status_and_detail(answer)
    assert status == 408 and "headers" in detail and seconds < HEADER_SECONDS + 2


def test_malformed_http_gets_a_json_400(server: tuple[str, int]) -> None:
    answer, _ = exchange(server, b"NOT HTTP AT ALL\r\n\r\n")
    status, detail = status_and_detail(answer)
    assert status == 400 and detail


def _upload_head(length: int) -> bytes:
    return (
        b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b'Content-Length: %d\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" % length
    )


def test_a_stalled_body_gets_408(server: tuple[str, int]) -> None:
    answer, seconds = exchange(server, _upload_head(100_000) + png()[:100])
    status, detail = status_and_detail(answer)
    assert status == 408 and "stalled" in detail and seconds < BODY_SECONDS + 2
    assert healthz_ms(server) < 100


def test_a_disconnect_mid_upload_is_one_info_line(server: tuple[str, int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with socket.create_connection(server) as s:
        s.sendall(_upload_head(100_000) + png()[:100])
        time.sleep(0.1)
    time.sleep(0.3)  # the server notices the closed socket on its next read
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert not errors, [r.getMessage() for r in errors]
    assert len(lines) == 1 and "POST /v1/search" in lines[0], lines


def test_shutdown_is_not_held_by_a_slow_uploader(service_pairs: list[Any], tmp_path: Path) -> None:
    """SIGTERM with an upload trickling in: the process exits after IMGSIM_SHUTDOWN_SECONDS, the
    cut request gets 503 (not 500) and one INFO line (no traceback); a client that hung up
    earlier got its INFO line at the default log level."""
    port = free_port()
    pair = service_pairs[0]
    log = tmp_path / "serve.log"
    proc = _serve(pair.model, pair.index, port, log, IMGSIM_SHUTDOWN_SECONDS="1", IMGSIM_BODY_SECONDS="600")
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(_upload_head(100_000) + png()[:100])
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_upload_head(1_000_000) + png()[:100])
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for _ in range(20):  # keep trickling while the server shuts down
                if proc.poll() is not None:
                    break
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                time.sleep(0.25)
            proc.wait(timeout=30)
            seconds = time.monotonic() - start
            s.settimeout(2)
            with contextlib.suppress(OSError):
                answer = s.recv(65536)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert seconds < 1 + 3, (seconds, text[-2000:])
    assert answer.startswith(b"HTTP/1.1 503"), (answer[:200], text[-2000:])
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]
    assert text.count("request cut by the shutdown deadline: POST /v1/search") == 1, text[-2000:]
    assert "client disconnected: POST /v1/search" in text, text[-2000:]
