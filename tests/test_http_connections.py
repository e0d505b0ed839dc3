"""The real connections under HTTPTransport (aiohttp's, through httpx-aiohttp): kept alive and
reused, and every socket fault reported as httpcore reported it (test_http.py injects
httpx.MockTransport, which never reaches them). Small asyncio servers on 127.0.0.1."""

import asyncio
import json
import socket
import struct

import pytest

from proxyclient.adapters import http as http_module
from proxyclient.adapters.http import HTTPTransport
from proxyclient.errors import APIConnectionError, APITimeoutError


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(http_module, "INITIAL_BACKOFF_S", 0.001)
    monkeypatch.setattr(http_module, "MAX_BACKOFF_S", 0.002)


class Server:
    """A minimal HTTP/1.1 server: ``behaviour`` is ``answer`` (a JSON echo of the request line,
    kept alive), ``close`` (reads the request, closes without answering) or ``reset`` (RST)."""

    def __init__(self, behaviour: str = "answer", delay: float = 0.0) -> None:
        self.behaviour, self.delay = behaviour, delay
        self.connections = 0
        self.request_lines: list[str] = []
        self.port = 0

    async def handle(self, reader, writer) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                self.request_lines.append(lines[0])
                length = next(
                    (int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")),
                    0,
                )
                await reader.readexactly(length)
                if self.behaviour == "close":
                    break
                if self.behaviour == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                await asyncio.sleep(self.delay)
                body = json.dumps({"line": lines[0]}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def serving(server: Server):
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    return listening


def test_connections_are_kept_alive_and_reused():
    server = Server(delay=0.05)

    async def run():
        listening = await serving(server)
        client = HTTPTransport(f"http://127.0.0.1:{server.port}/v1")
        try:
            for _ in range(3):  # 3 rounds of 40 at once, then 10 in turn
                got = await asyncio.gather(
                    *(client.request_json("POST", "/completions", {"i": i}) for i in range(40))
                )
                assert got == [{"line": "POST /v1/completions HTTP/1.1"}] * 40
            for _ in range(10):
                await client.request_json("GET", "/models")
        finally:
            await client.aclose()
            listening.close()

    asyncio.run(run())
    # httpcore kept 20 alive: each round opened 20 new ones.
    assert server.connections == 40


@pytest.mark.parametrize("behaviour", ["close", "reset"])
def test_a_dropped_or_reset_connection_is_a_connection_error(behaviour):
    server = Server(behaviour)

    async def run():
        listening = await serving(server)
        client = HTTPTransport(f"http://127.0.0.1:{server.port}/v1", max_retries=2)
        try:
            with pytest.raises(APIConnectionError, match="could not connect after 3 attempts"):
                await client.request_json("POST", "/completions", {"x": 1})
        finally:
            await client.aclose()
            listening.close()

    asyncio.run(run())
    assert server.connections == 3


def test_a_refused_connection_is_a_connection_error_not_a_timeout():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    async def run():
        client = HTTPTransport(f"http://127.0.0.1:{port}/v1", max_retries=1)
        try:
            await client.request_json("POST", "/completions", {"x": 1})
        finally:
            await client.aclose()

    with pytest.raises(APIConnectionError, match="could not connect after 2 attempts") as caught:
        asyncio.run(run())
    assert not isinstance(caught.value, APITimeoutError)


def test_the_environment_proxy_is_used_as_httpx_used_it(monkeypatch):
    proxy = Server()

    async def run():
        listening = await serving(proxy)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = HTTPTransport("http://base.invalid:8000/v1")
        try:
            return await client.request_json("GET", "/models")
        finally:
            await client.aclose()
            listening.close()

    assert asyncio.run(run()) == {"line": "GET http://base.invalid:8000/v1/models HTTP/1.1"}
