"""``lk-vllm send`` (serving.traffic) against a stand-in OpenAI server (http.server): both acceptance lengths
from the responses' own counters, failures counted with their reason and the exit status, --duration, bad input."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lk_vllm.errors import UserError
from serving import traffic

pytestmark = pytest.mark.unit


class _Handler(BaseHTTPRequestHandler):
    # per prompt text: (completion tokens, spec steps, accepted draft tokens); "fail" answers HTTP 500
    answers: dict[str, tuple[int, int, int]] = {}
    seen: list[dict] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self._json(200, {"data": [{"id": "tiny"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        text = body["messages"][-1]["content"]
        if text == "fail":
            self._json(500, {"error": "engine died"})
            return
        tokens, steps, accepted = self.answers[text]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [
            {"choices": [{"delta": {"content": "x"}}]},
            {
                "choices": [],
                "usage": {"completion_tokens": tokens},
                "metrics": {
                    "speculative_decoding": {"num_spec_steps": steps, "num_accepted_draft_tokens": accepted}
                },
            },
        ]
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    _Handler.answers = {"a": (10, 5, 5), "b": (12, 4, 8), "c": (3, 0, 0)}  # ALs 2.0, 3.0, no drafts
    _Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _messages(*texts):
    return [[{"role": "user", "content": t}] for t in texts]


def _send(url, messages, **overrides):
    options = dict(concurrency=2, max_tokens=16, temperature=0.0, duration=None, api_key=None, timeout=30)
    return traffic.send(url, "tiny", messages, **{**options, **overrides})


def test_both_acceptance_lengths_from_the_responses_own_counters(server):
    report = _send(server, _messages("a", "b", "c"))
    assert report["requests"] == 3 and report["failed"] == 0 and report["completion_tokens"] == 25
    assert report["requests_with_drafts"] == 2
    assert report["acceptance_length_pooled"] == pytest.approx(1 + 13 / 9)
    assert report["acceptance_length_mean_of_request_means"] == pytest.approx((2.0 + 3.0) / 2)
    assert all(body["stream"] and body["stream_options"] == {"include_usage": True} for body in _Handler.seen)


def test_failures_are_counted_with_their_reason_and_set_the_exit_status(server, capsys, monkeypatch):
    report = _send(server, _messages("a", "fail", "b"))
    assert report["requests"] == 3 and report["failed"] == 1
    assert "request 1" in report["errors"][0] and "500" in report["errors"][0]
    assert report["acceptance_length_pooled"] == pytest.approx(1 + 13 / 9)  # the failed one counts nothing
    monkeypatch.setattr(traffic, "load_messages", lambda *a: _messages("a", "fail"))
    args = _args(url=server, json=True)
    assert traffic.run(args) == 1
    assert json.loads(capsys.readouterr().out.strip())["failed"] == 1


def test_duration_cycles_through_the_prompts(server):
    report = _send(server, _messages("a"), duration=0.5, concurrency=1)
    assert report["requests"] >= 2 and report["failed"] == 0
    assert report["acceptance_length_pooled"] == pytest.approx(2.0)


def _args(**overrides):
    parser = argparse.ArgumentParser()
    traffic.add_arguments(parser)
    args = parser.parse_args(["--dataset", "mtbench"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("concurrency", 0, "--concurrency: expected an integer >= 1, found 0"),
        ("offset", -1, "--offset: expected an integer >= 0, found -1"),
        ("duration", 0.0, "--duration: expected a positive number of seconds, found 0.0"),
        ("temperature", -0.5, "--temperature: expected a value >= 0, found -0.5"),
    ],
)
def test_bad_flags_are_one_line_errors(flag, value, message):
    with pytest.raises(UserError, match=message):
        traffic.run(_args(**{flag: value}))


def test_no_server_and_an_exhausted_offset_are_one_line_errors():
    with pytest.raises(UserError, match="expected a running OpenAI server"):
        traffic.server_model("http://127.0.0.1:9", None)
    with pytest.raises(UserError, match="no prompts left after --offset 1000"):
        traffic.load_messages(["mtbench"], "eval", 1000, None)
