"""The calibration (serving.calibrate): the client-side timing window and --batch-sizes (the served end to
end check is in test_serve.py)."""

from __future__ import annotations

import pytest

from lk_vllm.errors import UserError
from serving.calibrate import decode_window
from serving.client import Completion

pytestmark = pytest.mark.unit


def stream(first: float, step: float, tokens: int) -> Completion:
    times = [first + i * step for i in range(tokens)]
    return Completion(
        text="",
        completion_tokens=tokens,
        spec_metrics=None,
        started=0.0,
        first_token=times[0],
        finished=times[-1],
        last_token=times[-1],
        chunks=tokens,
        chunk_times=times,
    )


def test_window_keeps_only_the_steps_all_streams_decode_together():
    # Two streams, 40 ms steps; the second one joined one step late and its prefill step took 100 ms, so the
    # first stream's steps before 0.14 s ran alone and must not count.
    first = stream(0.0, 0.04, 20)
    second = stream(0.14, 0.04, 20)
    point = decode_window([first, second], 2)
    assert point["seconds_per_token"] == pytest.approx(0.02)
    assert point["batch_size"] == 2
    assert point["steps"] == round((first.chunk_times[-1] - 0.14) / 0.04)


def test_window_refuses_streams_that_hardly_overlap():
    with pytest.raises(RuntimeError, match="overlapped"):
        decode_window([stream(0.0, 0.04, 5), stream(0.12, 0.04, 5)], 2)
    with pytest.raises(RuntimeError, match="two tokens"):
        decode_window([stream(0.0, 0.04, 1), stream(0.0, 0.04, 9)], 2)
    with pytest.raises(RuntimeError, match="two tokens"):
        decode_window([stream(0.0, 0.04, 9)], 2)


def test_calibrate_batch_sizes_input():
    from serving.calibrate import parse_batch_sizes

    assert parse_batch_sizes("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(UserError, match="--batch-sizes"):
            parse_batch_sizes(bad)
