"""The bench's measuring loop (lk_vllm.bench.runner): a closed loop keeps exactly C requests in flight."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


class _FakeEngine:
    """Finishes the oldest in-flight request every second step; records the largest number in flight."""

    def __init__(self):
        self.in_flight, self.most, self.steps = [], 0, 0

    def add_request(self, request_id, prompt, params):
        self.in_flight.append((request_id, len(prompt["prompt_token_ids"])))
        self.most = max(self.most, len(self.in_flight))

    def step(self):
        from types import SimpleNamespace

        self.steps += 1
        if self.steps % 2 or not self.in_flight:
            return [SimpleNamespace(request_id=r, finished=False, outputs=[]) for r, _ in self.in_flight]
        request_id, length = self.in_flight.pop(0)
        return [
            SimpleNamespace(
                request_id=request_id, finished=True, outputs=[SimpleNamespace(token_ids=list(range(length)))]
            )
        ]


@pytest.mark.vllm
@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_drive_keeps_exactly_c_requests_in_flight(concurrency):
    from lk_vllm.bench.runner import drive

    prompts = [[0] * n for n in range(1, 6)]
    engine, done = _FakeEngine(), []
    tokens, seconds = drive(engine, prompts, [None] * len(prompts), concurrency, lambda: done.append(1))
    assert tokens == sum(range(1, 6))  # each fake answer is as long as its prompt
    assert len(done) == 5 and not engine.in_flight and seconds >= 0
    assert engine.most == min(concurrency, 5)


@pytest.mark.vllm
def test_eval_engine_prefills_whole_prompts_on_cpu(monkeypatch, tmp_path):
    """Its requests sample with a seed: on CPU a split prefill would crash vLLM 0.32 at T>0."""
    import lk_vllm.bench.runner as runner
    from lk_vllm import engine

    started = {}

    def capture(settings):
        started["kwargs"] = settings.llm_kwargs()
        raise RuntimeError("no engine in this test")

    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(runner, "make_llm", capture)
    monkeypatch.setattr(
        runner, "speculative_config_for", lambda directory, k: {"method": "eagle3", "model": directory}
    )
    with pytest.raises(RuntimeError, match="no engine"):
        runner.evaluate_vllm(str(tmp_path), "/target", {"mtbench": [[1] * 3000]}, 3, 96, 1.0)
    assert started["kwargs"]["enable_chunked_prefill"] is False
    assert started["kwargs"]["max_num_batched_tokens"] >= 3000 + 96
