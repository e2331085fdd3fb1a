"""MLP speculator in vLLM 0.32's V1 engine through lk-vllm's plugin (lk_vllm.plugin.engine.mlp_proposer).

Fast: the row selection for batches, the patches' idempotency and version check; the engine config vLLM builds
in its own process (slow, no engine) accepts a fitting drafter and refuses a mismatched one. (How
``lk-vllm serve --drafter`` builds the ``mlp_speculator`` config: test_launcher.py.)

Slow (one engine for the module): plain vLLM's OpenAI server, started with lk-vllm installed but not named
(``VLLM_PLUGINS`` unset) and ``--speculative-config '{"method": "mlp_speculator", ...}'``, serves a briefly
trained MLP speculator on the default target; four prompts arrive at once (batch > 1). Its Prometheus counters
give the same mean acceptance length, per position, as the torch simulation at T=0; the per-response metrics
add up to the same counts; the outputs are the target's greedy continuations. The offline ``vllm.LLM`` path
(``lk-vllm eval --engine vllm``) builds the same engine config in its own process (checked without an
engine above, with the refusal of a mismatched drafter) and runs the same patched runner in the engine core.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from drafter_helpers import MLP_CONFIG
from parity_helpers import MAX_TOKENS, K, assert_parity, train_drafter
from train_helpers import FP32_ENGINE

pytestmark = pytest.mark.unit


def test_last_accepted_rows_pick_the_position_that_sampled_the_last_token():
    from lk_vllm.plugin.engine.mlp_proposer import last_accepted_rows

    # Prefill step: one row per request.
    assert last_accepted_rows([[5], [7]], None) == ([0, 1], [5, 7])
    # Verification: request 0 had 3 drafts, accepted 1 (+1 bonus) -> rows 0..3, last sampled at row 1;
    # request 1 had 3 drafts, all accepted -> rows 4..7, row 7; request 2 is a prefill chunk with nothing
    # sampled (its drafts are ignored) -> its only row, token 0; request 3 had no drafts -> its only row.
    rows, tokens = last_accepted_rows([[11, 12], [21, 22, 23, 24], [], [41]], [3, 3, 0, 0])
    assert rows == [1, 7, 8, 9]
    assert tokens == [12, 24, 0, 41]


@pytest.mark.vllm
def test_install_is_idempotent_and_checks_what_it_patches(monkeypatch):
    from vllm.model_executor.models import ModelRegistry
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from lk_vllm import engine, plugin
    from lk_vllm.plugin import patching
    from lk_vllm.plugin.engine import mlp_proposer

    plugin.register()
    init, propose = GPUModelRunner.__init__, GPUModelRunner.propose_draft_token_ids
    plugin.register()
    assert mlp_proposer.installed()
    assert (GPUModelRunner.__init__, GPUModelRunner.propose_draft_token_ids) == (init, propose)
    assert init.__wrapped__.__qualname__ == "GPUModelRunner.__init__"  # wrapped once, not twice
    assert mlp_proposer.ARCHITECTURE in ModelRegistry.get_supported_archs()

    class Changed:
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids):
            pass

    # The proposer's wrappers were written for vLLM 0.32.0's parameters: another runner's are refused.
    propose = next(point for point in mlp_proposer._patch_points() if point[1] == "propose_draft_token_ids")
    with pytest.raises(RuntimeError, match=r"Changed.propose_draft_token_ids was written for parameters"):
        patching.wrap(Changed, "propose_draft_token_ids", propose[2], parameters=propose[3], why="test")
    monkeypatch.setattr(engine, "vllm_version", lambda: "0.33.0")
    with pytest.raises(RuntimeError, match="built for vLLM 0.32.0 but vLLM 0.33.0"):
        mlp_proposer.install()


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_config_accepts_a_fitting_mlp_speculator_and_refuses_a_mismatched_one(
    default_target, tmp_path
):
    """What ``vllm.LLM``, ``lk-vllm eval --engine vllm`` and plain ``vllm serve`` build in their own process,
    without an engine: the plugin's registration lets vLLM resolve the drafter and keep the method, and a
    drafter that does not fit is refused there, before any engine process starts, with the mismatch named."""
    from lk_vllm.engine import EngineSettings, apply_engine_env

    apply_engine_env()
    from vllm.engine.arg_utils import EngineArgs

    target_config = json.loads((Path(default_target) / "config.json").read_text())
    fitting = {"emb_dim": target_config["hidden_size"], "vocab_size": target_config["vocab_size"]}

    def engine_config(name, k=3, **changes):
        drafter = tmp_path / name
        drafter.mkdir()
        (drafter / "config.json").write_text(json.dumps({**MLP_CONFIG, **fitting, **changes}))
        spec = {"method": "mlp_speculator", "model": str(drafter), "num_speculative_tokens": k}
        kwargs = EngineSettings(model=default_target, speculative_config=spec).llm_kwargs()
        kwargs.pop("disable_log_stats")
        return EngineArgs(**kwargs).create_engine_config()

    config = engine_config("fits")
    assert config.speculative_config.method == "mlp_speculator"
    assert config.speculative_config.draft_model_config.architectures == ["MLPSpeculatorPreTrainedModel"]
    assert (
        config.scheduler_config.async_scheduling is False
    )  # vLLM turns it off for this method, as for Medusa
    with pytest.raises(
        ValueError,
        match=f"target hidden states of size 64 \\(emb_dim\\), but the target's hidden "
        f"size is {target_config['hidden_size']}",
    ):
        engine_config("narrow", emb_dim=64)
    # (vLLM itself refuses K > n_predict unless K is a multiple of n_predict, meant for reused MTP layers.)
    with pytest.raises(
        ValueError, match="it has 3 stages \\(n_predict\\), fewer than num_speculative_tokens 6"
    ):
        engine_config("short", k=6)


# ------------------------------------------------------------------------------------------ slow: one engine
@pytest.fixture(scope="module")
def mlp_dir(setup, tmp_path_factory):
    from lk_vllm.drafters import create_drafter, target_info

    target = setup["target"]
    drafter = create_drafter("mlp_speculator", target, n_predict=K)
    train_drafter(drafter, setup, steps=20, lr=3e-3)
    directory = tmp_path_factory.mktemp("mlp") / "mlp"
    return drafter.save_pretrained(
        directory, target=target_info(target), training={"loss": "kl", "steps": 20}
    )


@pytest.fixture(scope="module")
def torch_summary(mlp_dir, setup):
    """The torch simulation at T=0 (computed before the server starts: it would compete for the CPU)."""
    from lk_vllm.drafters import load_drafter
    from training.evaluate import evaluate_torch

    target = setup["target"]
    counts = evaluate_torch(
        load_drafter(mlp_dir, target),
        target,
        setup["prompts"],
        K,
        MAX_TOKENS,
        0.0,
        continuations=setup["continuations"],
    )
    return counts["mtbench"].summary()


@pytest.fixture(scope="module")
def plain_server(mlp_dir, setup, tmp_path_factory):
    """vLLM's own OpenAI server, lk-vllm installed but not named anywhere, serving the MLP speculator."""
    from lk_vllm.engine import EngineSettings
    from serving.launcher import ServerHandle, free_port, wait_healthy

    target = setup["target"].path
    # Probabilistic drafts at T > 0 (what lk-vllm serve sets); at T = 0 they are the argmax either way.
    spec = {
        "method": "mlp_speculator",
        "model": str(mlp_dir),
        "num_speculative_tokens": K,
        "draft_sample_method": "probabilistic",
    }
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0", "HF_HUB_OFFLINE": "1"})
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                *EngineSettings(model=target, max_model_len=1024, **FP32_ENGINE).server_args(),
                "--speculative-config",
                json.dumps(spec),
                "--per-request-spec-decode-metrics",
                "summary",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_healthy(handle.url, process, timeout=900)
        yield handle
    except BaseException:
        print(handle.log_tail(80))
        raise
    finally:
        handle.stop()


def _spec_counters(url: str) -> tuple[int, list[int]]:
    """(drafts, accepted per position) from vLLM's Prometheus counters."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    drafts, per_position = 0, [0] * K
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:spec_decode_num_drafts_total":
                drafts += int(sample.value)
            elif sample.name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
                per_position[int(sample.labels["position"])] += int(sample.value)
    return drafts, per_position


@pytest.mark.e2e
@pytest.mark.slow
def test_plain_vllm_serves_the_mlp_speculator_with_torch_parity(torch_summary, plain_server, setup):
    from lk_vllm.acceptance import Counts
    from serving.client import request_json

    target = setup["target"]
    prompt_ids = [target.chat_prompt_ids(p.messages) for p in setup["prompts"]]
    before = _spec_counters(plain_server.url)

    def complete(ids, temperature=0.0):
        body = {
            "model": target.path,
            "prompt": ids,
            "max_tokens": MAX_TOKENS,
            "temperature": temperature,
            "return_token_ids": True,
            "seed": 0,
        }
        return request_json(plain_server.url, "/v1/completions", body)

    with concurrent.futures.ThreadPoolExecutor(len(prompt_ids)) as pool:  # batch > 1 in the engine
        responses = list(pool.map(complete, prompt_ids))
    drafts, per_position = _spec_counters(plain_server.url)
    served = Counts(
        K,
        num_drafts=drafts - before[0],
        accepted_per_position=[a - b for a, b in zip(per_position, before[1], strict=True)],
    )
    assert_parity(torch_summary, served.summary(), minimum=1.3)

    # The per-response metrics count the same drafts (another aggregation path in vLLM).
    per_request = [r["metrics"]["speculative_decoding"] for r in responses]
    assert sum(m["num_spec_steps"] for m in per_request) == served.num_drafts
    assert sum(m["num_accepted_draft_tokens"] for m in per_request) == sum(served.accepted_per_position)
    # Lossless at T=0: every output is the target's own greedy continuation (up to its end-of-sequence).
    stops = target.stop_token_ids()
    for ids, response in zip(prompt_ids, responses, strict=True):
        tokens = response["choices"][0]["token_ids"]
        continuation = setup["continuations"][(tuple(ids), MAX_TOKENS + K + 1)]
        assert tokens == continuation[: len(tokens)]
        assert len(tokens) == MAX_TOKENS or tokens[-1] in stops

    # T = 1: drafts sampled from the stages' distributions and verified against them (no crash, sane counts;
    # acceptance at T > 0 is measured against the torch alpha in serving/README.md, it is too noisy here).
    with concurrent.futures.ThreadPoolExecutor(len(prompt_ids)) as pool:
        sampled = list(pool.map(lambda ids: complete(ids, temperature=1.0), prompt_ids))
    after_drafts, after_per_position = _spec_counters(plain_server.url)
    assert after_drafts > drafts
    assert all(
        0 <= a - b <= after_drafts - drafts for a, b in zip(after_per_position, per_position, strict=True)
    )
    assert all(0 < len(r["choices"][0]["token_ids"]) <= MAX_TOKENS for r in sampled)
