"""scripts/replay_server.py, the benchmarks' base with no compute: record through it, replay from
the file after the round trip, count what the recording lacks."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from scripts.replay_server import MISS_STATUS, ReplayServer, canonical_key, load_recording


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    calls = 0

    def do_POST(self) -> None:
        Upstream.calls += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = json.dumps({"path": self.path, "got": json.loads(body), "n": Upstream.calls})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args: object) -> None:
        pass


def test_the_key_is_the_exact_request_with_canonical_json():
    a = canonical_key("post", "/v1/completions", b'{"b": [1, 2], "a": 1}')
    assert a == canonical_key("POST", "/v1/completions", b'{"a":1,"b":[1,2]}')
    assert a != canonical_key("POST", "/v1/completions", b'{"a":1,"b":[2,1]}')
    assert a != canonical_key("POST", "/v1/completions?x=1", b'{"a":1,"b":[1,2]}')


def test_record_then_replay_after_the_round_trip_and_count_misses(tmp_path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    recording = tmp_path / "r.jsonl.gz"
    try:
        root = f"http://127.0.0.1:{upstream.server_address[1]}"
        with ReplayServer("record", recording, upstream=root) as recorder:
            first = httpx.post(f"{recorder.root_url}/v1/completions", json={"a": 1, "b": 2})
            again = httpx.post(f"{recorder.root_url}/v1/completions", json={"b": 2, "a": 1})
            assert first.json() == {"path": "/v1/completions", "got": {"a": 1, "b": 2}, "n": 1}
            assert again.json()["n"] == 2  # record mode always asks the real server
            assert recorder.stats()["recorded"] == 1
    finally:
        upstream.shutdown()
    assert len(load_recording(recording)) == 1

    with ReplayServer("replay", recording, rtt_ms=100) as replay:
        started = time.perf_counter()
        hit = httpx.post(f"{replay.root_url}/v1/completions", json={"b": 2, "a": 1})
        assert time.perf_counter() - started >= 0.1
        assert hit.json()["n"] == 2 and hit.headers["content-type"] == "application/json"
        miss = httpx.post(f"{replay.root_url}/v1/completions", json={"a": 2})
        assert miss.status_code == MISS_STATUS and "replay miss" in miss.json()["error"]["message"]
        stats = replay.stats()
        assert (stats["hits"], stats["misses"], stats["connections"]) == (1, 1, 2)
