"""Traffic capture for retraining (lk_vllm.plugin.server.capture): the decision against the live store's
per-request acceptance, the files (read back by `lk-vllm prepare`'s dataset loader), rotation, a directory that
cannot be written or fills up, the limit, the ASGI middleware on plain and streamed responses, and the admin's
choice outliving a restart. Fast: no engine (the store is fed as the stat logger feeds it). The admin route is
in test_routes.py, the serve flags in test_launcher.py."""

import json
from pathlib import Path

import pytest
from server_helpers import TRAFFIC, make_store

from lk_vllm.errors import UserError
from lk_vllm.plugin.server import capture as capture_module
from lk_vllm.plugin.server.capture import (
    CaptureMiddleware,
    CaptureSettings,
    TrafficCapture,
    prompt_record,
    quantile,
)
from lk_vllm.plugin.server.live_stats import LiveStatsStore

pytestmark = pytest.mark.unit


CHAT = "/v1/chat/completions"


def _response(length, steps=10):
    accepted = round((length - 1) * steps)
    return {
        "choices": [{"message": {"content": "the answer"}}],
        "metrics": {
            "speculative_decoding": {
                "num_spec_steps": steps,
                "num_accepted_draft_tokens": accepted,
                "mean_acceptance_length": length,
            }
        },
    }


def _body(text="why is the sky blue?", **fields):
    return {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
        **fields,
    }


@pytest.fixture
def capture(tmp_path):
    return TrafficCapture(CaptureSettings(directory=str(tmp_path / "captured")), make_store(TRAFFIC))


def test_low_acceptance_requests_are_captured_and_prepare_reads_them(capture, tmp_path):
    from lk_vllm.datasets import load_prompts

    assert quantile(TRAFFIC, 0.2) == pytest.approx(1.5)
    secret = _body("write a haiku", user="alice@example.com", temperature=0, tools=[{"type": "function"}])
    assert capture.offer(CHAT, secret, _response(1.2)) == "captured"
    assert capture.offer(CHAT, _body("ok"), _response(1.5)) == "captured"  # at the quantile
    assert capture.offer(CHAT, _body("fine"), _response(2.5)) == "above_threshold"
    assert capture.offer("/v1/completions", {"prompt": "def fib(n):"}, _response(1.1)) == "captured"
    status = capture.status()
    assert status["captured"] == 3 and status["seen"] == 4 and status["skipped"]["above_threshold"] == 1
    assert status["thresholds"]["temperature_0"] == pytest.approx(1.5) and status["stopped"] is None
    [name] = status["files"]
    path = tmp_path / "captured" / name
    text = path.read_text()
    assert "alice" not in text and "function" not in text and "the answer" not in text  # the prompt only
    prompts = load_prompts(str(path))
    assert [p.messages for p in prompts] == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write a haiku"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ok"}],
        [{"role": "user", "content": "def fib(n):"}],
    ]
    first = json.loads(text.splitlines()[0])
    assert first["acceptance_length"] == pytest.approx(1.2) and first["sampling"] == "temperature_0"


def test_each_sampling_mode_has_its_own_threshold_and_needs_enough_traffic(tmp_path):
    store = make_store(TRAFFIC, mode="temperature_0")
    capture = TrafficCapture(CaptureSettings(directory=str(tmp_path)), store)
    # No sampled traffic yet: a sampled request is not judged against greedy requests.
    assert capture.offer(CHAT, _body(temperature=0.8), _response(1.0)) == "warming_up"
    few = TrafficCapture(CaptureSettings(directory=str(tmp_path)), make_store(TRAFFIC[:5]))
    assert few.offer(CHAT, _body(), _response(1.0)) == "warming_up"
    assert capture.offer(CHAT, _body(), {"choices": []}) == "no_acceptance"  # a response without metrics


def test_prompts_prepare_cannot_read_are_skipped():
    assert prompt_record(
        CHAT,
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
                {"role": "assistant", "content": "b"},
            ]
        },
    ) == {"messages": [{"role": "user", "content": "a"}]}  # text parts kept, the answer dropped
    assert (
        prompt_record(
            CHAT, {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]}
        )["messages"][0]["role"]
        == "system"
    )
    assert prompt_record(CHAT, {"messages": [{"role": "tool", "content": "x"}]}) is None
    assert prompt_record("/v1/completions", {"prompt": [1, 2, 3]}) is None  # token ids
    assert prompt_record("/v1/completions", {"prompt": ["a", "b"]}) is None  # a batch
    assert prompt_record(CHAT, "not json") is None


def test_files_rotate(capture, monkeypatch):
    monkeypatch.setattr(capture_module, "ROTATE_BYTES", 300)
    for i in range(6):
        assert capture.offer(CHAT, _body(f"question {i} " + "x" * 100), _response(1.0)) == "captured"
    assert len(capture.status()["files"]) >= 3


def test_a_directory_that_cannot_be_written_stops_capture_not_serving(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    capture = TrafficCapture(CaptureSettings(directory=str(blocker / "sub")), make_store(TRAFFIC))
    assert capture.offer(CHAT, _body(), _response(1.0)) == "off"
    status = capture.status()
    assert not status["active"] and "failed: Not a directory" in status["stopped"] and status["captured"] == 0
    assert capture.offer(CHAT, _body(), _response(1.0)) == "off"  # stays stopped, never raises


def test_a_full_disk_stops_capture(capture, monkeypatch, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    monkeypatch.setattr(TrafficCapture, "_next_file", lambda self: Path("/dev/full"))
    assert capture.offer(CHAT, _body(), _response(1.0)) == "off"
    assert "No space left on device" in capture.status()["stopped"]


def test_the_size_limit_stops_capture_and_turning_it_on_again_resumes(tmp_path):
    capture = TrafficCapture(
        CaptureSettings(directory=str(tmp_path), max_megabytes=1000 / 2**20), make_store(TRAFFIC)
    )
    outcomes = [capture.offer(CHAT, _body("y" * 60), _response(1.0)) for _ in range(8)]
    first_off = outcomes.index("off")
    assert first_off >= 2 and set(outcomes[first_off:]) == {"off"}
    assert capture.status()["bytes_written"] <= 1000
    assert "reached --capture-max-mb" in capture.status()["stopped"]
    capture.set_enabled(False)
    capture.set_enabled(True)
    assert capture.status()["stopped"] is None and capture.offer(CHAT, _body(), _response(1.0)) == "captured"


def test_settings_are_checked_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"--capture-quantile: expected a fraction in \(0, 1\), found 1.5"):
        CaptureSettings(quantile=1.5)
    with pytest.raises(UserError, match="--capture-max-mb: expected a positive number of MiB, found 0"):
        CaptureSettings(max_megabytes=0)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="--capture-low-acceptance .*: expected a directory, found a file"):
        CaptureSettings(directory=str(tmp_path / "f"))
    with pytest.raises(UserError, match="not configured"):
        TrafficCapture(CaptureSettings(), LiveStatsStore()).set_enabled(True)


# ---------------------------------------------------------------------------------------------- over HTTP
def _app(capture, streamed: bool):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        length = float(body["messages"][-1]["content"])
        if not streamed:
            return _response(length)

        async def chunks():
            yield 'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
            yield "data: " + json.dumps({"choices": [], **_response(length)}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app.add_middleware(CaptureMiddleware, capture=capture)
    return app


@pytest.mark.parametrize("streamed", [False, True])
def test_the_middleware_passes_responses_through_and_captures(capture, streamed):
    from fastapi.testclient import TestClient

    client = TestClient(_app(capture, streamed))
    low = client.post(CHAT, json=_body("1.1"), headers={"Authorization": "Bearer sk-secret-key"})
    high = client.post(CHAT, json=_body("3.0"))
    assert low.status_code == high.status_code == 200
    if streamed:
        assert low.text.endswith("data: [DONE]\n\n")
    else:
        assert low.json() == _response(1.1)  # unchanged
    status = capture.status()
    assert status["captured"] == 1 and status["skipped"]["above_threshold"] == 1
    text = (Path(capture.settings.directory) / status["files"][0]).read_text()
    assert "sk-secret-key" not in text and "Bearer" not in text
    capture.set_enabled(False)
    client.post(CHAT, json=_body("1.0"))
    assert capture.status()["captured"] == 1  # off: nothing looked at


def test_an_admins_off_outlives_a_restart_and_on_does_too(capture):
    """A swap that restarts the engine starts a new server process with the same flags: the capture it builds
    keeps what the admin last chose, not the flag's "on"."""
    capture.set_enabled(False)
    restarted = TrafficCapture(capture.settings, make_store(TRAFFIC))
    assert not restarted.active
    assert restarted.offer(CHAT, _body(), _response(1.0)) == "off"
    restarted.set_enabled(True)
    assert TrafficCapture(capture.settings, make_store(TRAFFIC)).active
    assert not list(Path(capture.settings.directory).glob("*.jsonl"))  # the state is no capture file
