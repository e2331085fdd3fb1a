"""The vLLM plugin without an engine: entry points, version check, patches, stat logger, live store, speed-up
math, HTTP routes (auth, swap validation), dashboard assets, launcher input checks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import FAKE_TARGET_CONFIG, make_tiny_target, make_valid_drafter, serve_args

from lk_vllm import plugin
from lk_vllm.errors import UserError
from lk_vllm.plugin.server import speedup
from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ registration
@pytest.mark.vllm
def test_entry_points_name_the_three_plugins():
    found = {
        group: {e.name: e.value for e in entry_points(group=group)}
        for group in ("vllm.general_plugins", "vllm.stat_logger_plugins", "vllm.endpoint_plugins")
    }
    assert found["vllm.general_plugins"]["lk_general"] == "lk_vllm.plugin:register"
    assert found["vllm.stat_logger_plugins"]["lk_stats"] == "lk_vllm.plugin.server.stat_logger:LkStatLogger"
    assert (
        found["vllm.endpoint_plugins"]["lk_endpoints"]
        == "lk_vllm.plugin.server.endpoints:make_endpoint_plugin"
    )
    # what vLLM's loader requires of each
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
    from vllm.v1.metrics.loggers import StatLoggerBase

    from lk_vllm.plugin.server.endpoints import make_endpoint_plugin
    from lk_vllm.plugin.server.stat_logger import LkStatLogger

    assert issubclass(LkStatLogger, StatLoggerBase)
    assert isinstance(make_endpoint_plugin(), EndpointPlugin)
    assert set(plugin.PLUGIN_NAMES) == {"lk_general", "lk_stats", "lk_endpoints"}


@pytest.mark.vllm
def test_vllm_loads_all_lk_plugins_when_vllm_plugins_names_them(monkeypatch):
    import vllm.envs
    from vllm.plugins import load_endpoint_plugins, load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", plugin.plugins_env_value("other_plugin"))
    if hasattr(vllm.envs, "__getattr__") and hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()
    assert "lk_general" in load_plugins_by_group("vllm.general_plugins")
    assert "lk_stats" in load_plugins_by_group("vllm.stat_logger_plugins")
    assert [p.name for p in load_endpoint_plugins(("generate",))] == ["lk_endpoints"]
    # endpoint plugins need a "generate" server
    assert load_endpoint_plugins(("embed",)) == []


def test_plugins_env_value_keeps_the_users_list():
    assert plugin.plugins_env_value(None) == "lk_general,lk_stats,lk_endpoints"
    assert plugin.plugins_env_value("mine, lk_stats") == "mine,lk_stats,lk_general,lk_endpoints"


def test_register_refuses_another_vllm_version(monkeypatch, capsys):
    from lk_vllm import engine

    monkeypatch.setattr(engine, "vllm_version", lambda: "0.31.9")
    with pytest.raises(SystemExit) as exit_info:
        plugin.register()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "built for vLLM 0.32.0 but vLLM 0.31.9 is installed" in err


@pytest.mark.vllm
def test_register_is_idempotent():
    from vllm.v1.worker.worker_base import WorkerBase

    from lk_vllm.plugin import patches
    from lk_vllm.plugin.engine import worker

    plugin.register()
    plugin.register()
    assert WorkerBase.lk_reload_drafter is worker.lk_reload_drafter
    assert WorkerBase.lk_drafter_parameters is worker.lk_drafter_parameters
    from vllm.utils import cpu_triton_utils

    assert cpu_triton_utils._expand_kernel_impl is patches.expand_kernel_any_dtype


@pytest.mark.vllm
def test_worker_method_install_refuses_to_replace_a_vllm_method(monkeypatch):
    from vllm.v1.worker.worker_base import WorkerBase

    from lk_vllm.plugin.engine.worker import install_worker_methods

    monkeypatch.setattr(WorkerBase, "lk_reload_drafter", lambda self: None, raising=False)
    with pytest.raises(RuntimeError, match="WorkerBase.lk_reload_drafter already exists"):
        install_worker_methods()


# ------------------------------------------------------------------------------------------------ in-place reload
class _TinyDrafter(torch.nn.Module):
    """Stands in for a vLLM drafter module: one linear layer, loaded from a safetensors file."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4, bias=False)

    def load_weights(self, weights):
        return {name for name, _ in weights}


def _tiny_checkpoint(root: Path, name: str, seed: int) -> Path:
    path = root / name
    path.mkdir()
    save_file(
        {"fc.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))},
        str(path / "model.safetensors"),
    )
    return path


def _fake_vllm_config(tag: str):
    return SimpleNamespace(
        tag=tag,
        load_config=SimpleNamespace(load_format="auto"),
        speculative_config=SimpleNamespace(draft_load_config=None),
        compilation_config=SimpleNamespace(static_forward_context={}),
    )


def _proposer_layouts(live):
    """The proposer attribute layouts of vLLM 0.32 (names read from its source), each around ``live``:
    (runner attribute, proposer, the vllm_config tag the fresh drafter must be built with)."""
    draft_model_config = SimpleNamespace(model="/live/drafter")
    overridden = _fake_vllm_config("v2-with-draft-overrides")
    v2_spec = SimpleNamespace(
        draft_model_config=draft_model_config, apply_draft_overrides=lambda config: overridden
    )
    return {
        # vllm/v1/worker/gpu/spec_decode/speculator.py DraftModelSpeculator (V2 GPU runner)
        "v2-speculator": (
            "speculator",
            SimpleNamespace(vllm_config=_fake_vllm_config("v2"), speculative_config=v2_spec, model=live),
            "v2-with-draft-overrides",
        ),
        # vllm/v1/spec_decode/medusa.py MedusaProposer
        "v1-medusa": (
            "drafter",
            SimpleNamespace(
                vllm_config=_fake_vllm_config("medusa"),
                model=live,
                spec_config=SimpleNamespace(draft_model_config=draft_model_config),
            ),
            "medusa",
        ),
        # vllm/v1/spec_decode/llm_base_proposer.py (EAGLE, draft model) and lk_vllm.plugin.engine.mlp_proposer
        "v1-eagle": (
            "drafter",
            SimpleNamespace(
                _create_draft_vllm_config=lambda: _fake_vllm_config("eagle-draft"),
                speculative_config=SimpleNamespace(draft_model_config=draft_model_config),
                vllm_config=_fake_vllm_config("eagle-engine"),
                model=live,
            ),
            "eagle-draft",
        ),
    }


def _live_draft_model_config(proposer):
    return (getattr(proposer, "speculative_config", None) or proposer.spec_config).draft_model_config


@pytest.mark.vllm
@pytest.mark.parametrize("layout", ["v2-speculator", "v1-medusa", "v1-eagle"])
def test_in_place_reload_finds_the_drafter_in_every_runner_layout(layout, tmp_path, monkeypatch):
    """``lk_reload_drafter`` on a fake worker with each proposer layout: the fresh drafter is built from the new
    directory with the config vLLM built the live one with, and its weights land in the live module."""
    import vllm.model_executor.model_loader as model_loader
    from safetensors.torch import load_file

    from lk_vllm.plugin.engine.worker import lk_drafter_parameters, lk_reload_drafter

    built = []

    def get_model(*, vllm_config, model_config, prefix="", load_config=None):
        built.append((vllm_config.tag, model_config.model))
        fresh = _TinyDrafter()
        fresh.load_state_dict(load_file(str(Path(model_config.model) / "model.safetensors")))
        return fresh

    monkeypatch.setattr(model_loader, "get_model", get_model)
    live = _TinyDrafter()
    attribute, proposer, expected_tag = _proposer_layouts(live)[layout]
    worker = SimpleNamespace(
        model_runner=SimpleNamespace(model=torch.nn.Linear(2, 2), **{attribute: proposer})
    )
    new = _tiny_checkpoint(tmp_path, "new", seed=5)

    assert lk_drafter_parameters(worker) == {"fc.weight": [4, 4]}
    result = lk_reload_drafter(worker, str(new))
    assert built == [(expected_tag, str(new))]
    assert torch.equal(live.fc.weight, load_file(str(new / "model.safetensors"))["fc.weight"])
    assert result["modules"] == 1 and result["checksum"] != result["checksum_before"]
    assert (
        _live_draft_model_config(proposer).model == "/live/drafter"
    )  # the live config is not changed by a reload


@pytest.mark.vllm
def test_in_place_reload_refuses_a_drafter_without_weights():
    from lk_vllm.plugin.engine.worker import lk_reload_drafter

    for runner in (SimpleNamespace(model=None), SimpleNamespace(model=None, speculator=SimpleNamespace())):
        with pytest.raises(RuntimeError, match="no weights to reload"):
            lk_reload_drafter(SimpleNamespace(model_runner=runner), "/any")


# ------------------------------------------------------------------------------------------------ the CPU patch
def _expand_reference(values, cu, replace_from, replace_to):
    counts = [int(cu[0])] + [int(cu[i] - cu[i - 1]) for i in range(1, len(cu))]
    out = []
    for value, count in zip(values.tolist(), counts, strict=True):
        out += [replace_to if value == replace_from else value] * count
    return out


@pytest.mark.vllm
def test_vllms_cpu_expand_kernel_loses_float_values_and_the_patch_keeps_them():
    """The bug behind word salad at T > 0 with speculation on this CPU build, and its fix."""
    import vllm._custom_ops  # noqa: F401 - loads the C++ ops
    from vllm.utils import cpu_triton_utils

    from lk_vllm.plugin import patching
    from lk_vllm.plugin.patches import expand_kernel_any_dtype

    original = cpu_triton_utils._expand_kernel_impl
    if patching.is_patched(original):  # patched by an earlier test: find vLLM's own
        import importlib

        original = importlib.reload(cpu_triton_utils)._expand_kernel_impl
        plugin.register()
    temperatures = torch.tensor([0.8, 0.0, 1.3])  # 0 = greedy, replaced by 1 as vLLM does
    cu = torch.tensor([3, 4, 7])
    expected = _expand_reference(temperatures, cu, 0, 1)

    sentinel = torch.full((7,), 123.0)
    original(sentinel, temperatures, cu, 0, 1)  # the int replace values vLLM passes
    assert sentinel.tolist() == [123.0] * 7  # vLLM 0.32.0's CPU kernel writes into an int64 copy

    out = torch.full((7,), 123.0)
    expand_kernel_any_dtype(out, temperatures, cu, 0, 1)
    assert out.tolist() == pytest.approx(expected)
    ints = torch.empty(4, dtype=torch.int32)
    expand_kernel_any_dtype(ints, torch.tensor([5, 0], dtype=torch.int32), torch.tensor([1, 4]), 0, 9)
    assert ints.tolist() == [5, 9, 9, 9]


@pytest.mark.vllm
def test_the_patch_reaches_vllms_rejection_sampler_through_the_platform_overrides():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.sample import rejection_sampler

    plugin.register()  # what vLLM's worker does first ...
    CpuPlatform.register_triton_kernel_overrides()  # ... then the platform installs its kernels
    temperatures = torch.tensor([0.7, 0.0])
    expanded = rejection_sampler.expand_batch_to_tokens(
        temperatures, torch.tensor([2, 5]), 5, replace_from=0, replace_to=1
    )
    assert expanded.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------- the Medusa patch
def _tiny_medusa(truncated: int, vocab: int):
    """vLLM's Medusa module without a vLLM config: one head, a plain linear lm_head (what load_weights touches)."""
    from vllm.model_executor.models.medusa import Medusa

    model = Medusa.__new__(Medusa)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(original_lm_head=False)
    model.orig_vocab_size, model.truncated_vocab_size = vocab, truncated
    model.token_map = None
    model.lm_heads = torch.nn.ModuleList([torch.nn.Linear(2, truncated, bias=False)])
    return model


def _unloaded(model, loaded: set[str]) -> set[str]:
    """What vLLM's DefaultModelLoader.track_weights_loading rejects: parameters not reported as loaded."""
    return {name for name, _ in model.named_parameters()} - loaded


@pytest.mark.vllm
def test_vllms_medusa_rejects_its_own_token_map_and_the_patch_accepts_it():
    from vllm.model_executor.models.medusa import Medusa

    from lk_vllm.plugin.patches import patch_medusa_token_map

    assert patch_medusa_token_map() and patch_medusa_token_map()  # idempotent
    token_map = torch.tensor([0, 2, 5, 7])
    weights = [("token_map", token_map), ("lm_heads.0.weight", torch.arange(8.0).reshape(4, 2))]
    unpatched = Medusa.load_weights.__wrapped__  # vLLM's own method
    vllm_model = _tiny_medusa(4, 8)
    assert _unloaded(vllm_model, unpatched(vllm_model, iter(weights))) == {"token_map"}  # the bug

    model = _tiny_medusa(4, 8)
    loaded = model.load_weights(iter(weights))
    assert _unloaded(model, loaded) == set()
    assert torch.equal(model.token_map, token_map)
    assert torch.equal(model.lm_heads[0].weight, torch.arange(8.0).reshape(4, 2))
    full = _tiny_medusa(8, 8)  # no truncation: nothing to add
    assert "token_map" not in full.load_weights(iter([("lm_heads.0.weight", torch.zeros(8, 2))]))


# ------------------------------------------------------------------------------------------------ stat logger
def _vllm_config(spec=None, model="/no/such/model"):
    return SimpleNamespace(
        speculative_config=spec,
        model_config=SimpleNamespace(model=model, dtype=torch.float32, enforce_eager=True),
    )


def _stats(running, drafts=0, draft_tokens=0, accepted=0, per_pos=(), tokens=1, first_tokens=0, finished=0):
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    spec = SpecDecodingStats(
        num_spec_tokens=len(per_pos),
        num_drafts=drafts,
        num_draft_tokens=draft_tokens,
        num_accepted_tokens=accepted,
        num_accepted_tokens_per_pos=list(per_pos),
    )
    scheduler = SchedulerStats(num_running_reqs=running, spec_decoding_stats=spec if drafts else None)
    iteration = IterationStats()
    iteration.num_generation_tokens = tokens
    iteration.time_to_first_tokens_iter = [0.1] * first_tokens
    iteration.finished_requests = [object()] * finished
    return scheduler, iteration


@pytest.mark.vllm
def test_stat_logger_records_counts_batch_and_decode_timing(monkeypatch):
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    spec = SimpleNamespace(
        method="ngram",
        model=None,
        num_speculative_tokens=3,
        draft_sample_method="greedy",
        rejection_sample_method="standard",
    )
    logger = stat_logger.LkStatLogger(_vllm_config(spec))
    assert store.drafter.name == "ngram" and store.drafter.num_speculative_tokens == 3
    assert store.baseline is None and "lk-vllm calibrate" in store.baseline_error
    logger.record(*_stats(running=2, tokens=2, first_tokens=2))  # prefill step: not timed
    logger.record(
        *_stats(running=1, drafts=2, draft_tokens=6, accepted=3, per_pos=(2, 1, 0), tokens=5, finished=1)
    )
    steps = store.steps()
    assert [s.decode_seconds is None for s in steps] == [True, False]
    assert steps[1].batch_size == 2  # one still running + one that finished in this step
    summary = store.summary(steps)
    assert summary["num_drafts"] == 2 and summary["draft_tokens"] == 6 and summary["accepted_tokens"] == 3
    assert summary["acceptance_length"] == pytest.approx(2.5)
    assert summary["per_position_acceptance"] == pytest.approx([1.0, 0.5, 0.0])
    assert summary["output_tokens"] == 7


@pytest.mark.vllm
def test_stat_logger_is_inert_without_speculation(monkeypatch):
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    logger = stat_logger.LkStatLogger(_vllm_config(None))
    logger.record(*_stats(running=1, tokens=1))
    assert store.steps() == [] and store.drafter is None


def _finished_request(temperature, accepted_per_step, num_spec_tokens=2):
    """One request finished through vLLM's output processor (lk's patch on), with vLLM's own per-request
    counters: ``accepted_per_step[i]`` draft tokens of K were accepted at step i."""
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.metrics.stats import IterationStats, RequestSpecDecodeMetrics, RequestStateStats

    from lk_vllm.plugin.patches import patch_finished_request_spec_metrics

    assert patch_finished_request_spec_metrics() and patch_finished_request_spec_metrics()  # idempotent
    metrics = RequestSpecDecodeMetrics.new(num_spec_tokens)
    for accepted in accepted_per_step:
        metrics.observe(num_draft_tokens=num_spec_tokens, num_accepted=accepted)
    req_state = SimpleNamespace(
        external_req_id="r",
        request_id="r",
        prompt_len=4,
        max_tokens_param=16,
        stats=RequestStateStats(arrival_time=0.0),
        num_cached_tokens=0,
        lora_name=None,
        parent_req=None,
        spec_decode_metrics=metrics,
        temperature=temperature,
    )
    processor = SimpleNamespace(lora_states=SimpleNamespace(request_finished=lambda *args: None))
    iteration = IterationStats()
    OutputProcessor._update_stats_from_finished(processor, req_state, "stop", iteration)
    return iteration.finished_requests[0]


def _ngram_logger(monkeypatch, per_request_level: str):
    """A fresh store and the lk stat logger of an ngram engine with vLLM's per-request metrics at this level."""
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    spec = SimpleNamespace(
        method="ngram",
        model=None,
        num_speculative_tokens=2,
        draft_sample_method="greedy",
        rejection_sample_method="standard",
    )
    config = _vllm_config(spec)
    config.observability_config = SimpleNamespace(per_request_spec_decode_metrics=per_request_level)
    return store, stat_logger.LkStatLogger(config)


@pytest.mark.vllm
def test_stat_logger_records_each_finished_requests_own_acceptance(monkeypatch):
    """Two requests, one long at T=0 (2 tokens per step), one short sampled (3 per step): the two aggregations
    differ, and each number says which aggregation and sampling mode it is."""
    from lk_vllm.plugin.server import stat_logger

    store, logger = _ngram_logger(monkeypatch, "summary")
    scheduler, iteration = _stats(
        running=0, drafts=12, draft_tokens=24, accepted=14, per_pos=(9, 5), tokens=26
    )
    iteration.finished_requests = [_finished_request(0.0, [1] * 10), _finished_request(0.8, [2, 2])]
    assert stat_logger.finished_request_counts(iteration) == [(10, 10, "temperature_0"), (2, 4, "sampled")]
    logger.record(scheduler, iteration)
    summary = store.summary(store.steps())
    assert (
        summary["acceptance_length"] == pytest.approx(1 + 14 / 12)
        and summary["acceptance_length_aggregation"] == "pooled"
    )
    assert summary["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    labelled = {(e["aggregation"], e["sampling"]): e["value"] for e in summary["acceptance_lengths"]}
    assert labelled == pytest.approx(
        {
            ("pooled", "all"): 1 + 14 / 12,
            ("mean_of_request_means", "all"): 2.5,
            ("pooled", "temperature_0"): 2.0,
            ("mean_of_request_means", "temperature_0"): 2.0,
            ("pooled", "sampled"): 3.0,
            ("mean_of_request_means", "sampled"): 3.0,
        }
    )
    assert set(summary["aggregations"]) == {"pooled", "mean_of_request_means"}
    histogram = summary["request_acceptance_histogram"]
    assert (
        sum(histogram["counts"]["all"]) == 2
        and histogram["counts"]["sampled"][histogram["upper_bounds"].index(3.0)] == 1
    )
    assert store.per_request_source and store.per_request_missing is None

    copy = LiveStatsStore()  # the statistics carried over an engine restart keep the per-request sums
    copy.merge_snapshot(json.loads(json.dumps(store.snapshot())))
    assert copy.summary(copy.steps())["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    assert copy.since_start()["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)


@pytest.mark.vllm
def test_without_per_request_metrics_the_store_says_why(monkeypatch):
    store, _ = _ngram_logger(monkeypatch, "none")
    assert (
        store.per_request_source is None and "--per-request-spec-decode-metrics" in store.per_request_missing
    )


# ------------------------------------------------------------------------------------------------ store and speed-up
def _profile(points):
    return speedup.BaselineProfile(
        key={}, points=[{"batch_size": b, "seconds_per_token": s} for b, s in points]
    )


def test_baseline_interpolates_between_measured_batch_sizes():
    profile = _profile([(1, 0.1), (4, 0.04), (8, 0.02)])
    assert profile.seconds_per_token(1) == pytest.approx(0.1)
    assert profile.seconds_per_token(2) == pytest.approx(0.08)
    assert profile.seconds_per_token(6) == pytest.approx(0.03)
    assert profile.seconds_per_token(20) == pytest.approx(0.02)  # clamped at the ends


def test_speedup_is_baseline_time_over_live_time_traffic_weighted():
    store = LiveStatsStore()
    store.set_baseline(_profile([(1, 0.1), (4, 0.04)]))
    store.set_drafter(DrafterInfo(name="d", method="ngram", architecture="ngram", num_speculative_tokens=2))
    clock = [100.0]

    def step(batch, tokens, seconds):
        clock[0] += seconds
        store.record_step(batch_size=batch, output_tokens=tokens, timed=True, now=clock[0])

    store.record_step(batch_size=1, output_tokens=1, timed=False, now=clock[0])
    step(1, 3, 0.1)  # 3 tokens that would have cost 0.3 s: 3x
    step(4, 8, 0.16)  # 8 tokens at batch 4, 0.32 s without speculation: 2x
    result = speedup.speedup_of_steps(store.steps(), store.baseline)
    assert result["speedup"] == pytest.approx((0.3 + 0.32) / (0.1 + 0.16))
    assert result["speedup_by_batch_size"]["1"]["speedup"] == pytest.approx(3.0)
    assert result["speedup_by_batch_size"]["2-4"]["speedup"] == pytest.approx(2.0)
    assert result["tokens_per_s"] == pytest.approx(11 / 0.26)
    assert speedup.speedup_of_steps(store.steps(), None)["speedup"] is None


def test_window_and_per_drafter_statistics():
    import time

    store = LiveStatsStore()
    now = time.monotonic()
    store.set_drafter(DrafterInfo(name="a", method="eagle3", architecture="x", num_speculative_tokens=2))
    store.record_step(
        batch_size=1,
        output_tokens=2,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=1,
        accepted_per_position=[1, 0],
        now=now - 120,
    )
    store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=True,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
        now=now - 5,
    )
    store.set_drafter(DrafterInfo(name="b", method="eagle3", architecture="x", num_speculative_tokens=2))
    store.record_step(
        batch_size=1,
        output_tokens=1,
        timed=True,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=0,
        accepted_per_position=[0, 0],
        now=now - 1,
    )
    assert store.summary(store.steps(60))["num_drafts"] == 2
    assert store.summary(store.steps(None))["num_drafts"] == 3
    assert store.summary(store.steps(60, "a"))["acceptance_length"] == pytest.approx(3.0)
    assert store.since_start("a")["acceptance_length"] == pytest.approx(2.5)
    assert store.since_start("b")["acceptance_length"] == pytest.approx(1.0)
    assert store.since_start()["accepted_tokens"] == 3


def test_profile_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: expected a JSON calibration profile"):
        speedup.BaselineProfile.load(bad)
    bad.write_text(json.dumps({"points": [{"batch_size": 0, "seconds_per_token": 1}]}))
    with pytest.raises(UserError, match="batch_size >= 1"):
        speedup.BaselineProfile.load(bad)
    with pytest.raises(UserError, match="file not found"):
        speedup.BaselineProfile.load(tmp_path / "missing.json")
    good = _profile([(2, 0.05), (1, 0.1)])
    good.points.sort(key=lambda p: p["batch_size"])
    path = good.save(tmp_path / "sub" / "p.json")
    assert speedup.BaselineProfile.load(path).seconds_per_token(1) == pytest.approx(0.1)
    assert not list((tmp_path / "sub").glob("*.tmp"))


# ------------------------------------------------------------------------------------------------ HTTP routes
def _drafter_dir(root: Path, name: str, hidden: int = 8, seed: int = 0, extra: dict | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "hidden_size": hidden,
        "vocab_size": 32,
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"fc.weight": torch.randn(hidden, 3 * hidden, generator=generator)}, str(path / "model.safetensors")
    )
    return path


class FakeEngineClient:
    def __init__(self):
        self.calls = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args))
        return [{"tensors": 1, "checksum": 0.0}]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from lk_vllm.target_model import TargetModel

    return TargetModel(make_tiny_target(tmp_path_factory.mktemp("tiny-target")))


@pytest.fixture
def app_with_routes(tmp_path, monkeypatch, tiny_target):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lk_vllm.plugin.server import routes as api

    drafters = tmp_path / "drafters"
    live = make_valid_drafter(drafters, "live", tiny_target, seed=1)
    monkeypatch.setenv(api.ADMIN_KEY_ENV, "admin-secret")
    monkeypatch.setenv(api.DRAFTERS_DIR_ENV, str(drafters))
    store = LiveStatsStore()
    routes = api.LkRoutes(store)
    routes.engine_client = FakeEngineClient()
    app = FastAPI()
    app.include_router(routes.router())
    store.set_drafter(
        DrafterInfo(
            name=str(live),
            method="eagle3",
            architecture="LlamaForCausalLMEagle3",
            num_speculative_tokens=2,
            sampling={"draft_sample_method": "probabilistic"},
        )
    )
    return TestClient(app), routes, drafters, tiny_target


ADMIN = {"X-Admin-Key": "admin-secret"}


def test_stats_route_fields_and_window_validation(app_with_routes):
    client, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
    )
    body = client.get("/v1/speculative/stats").json()
    for field in (
        "drafter",
        "method",
        "num_speculative_tokens",
        "sampling",
        "acceptance_length",
        "per_position_acceptance",
        "draft_tokens",
        "accepted_tokens",
        "window_seconds",
        "speedup",
        "baseline",
        "since_start",
    ):
        assert field in body, field
    assert body["acceptance_length"] == pytest.approx(3.0) and body["window_seconds"] == 60.0
    assert body["drafter"]["architecture"] == "LlamaForCausalLMEagle3"
    assert client.get("/v1/speculative/stats?window=-1").status_code == 400
    assert client.get("/v1/speculative/stats?window=abc").status_code == 422
    assert client.get("/v1/speculative/stats?drafter=nope").status_code == 404
    history = client.get("/v1/speculative/history?seconds=60&resolution=5").json()
    assert len(history["points"]) == 1 and history["points"][0]["acceptance_length"] == pytest.approx(3.0)


def test_stats_route_answers_404_when_speculation_is_off():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lk_vllm.plugin.server import routes as api

    app = FastAPI()
    app.include_router(api.LkRoutes(LiveStatsStore()).router())
    response = TestClient(app).get("/v1/speculative/stats")
    assert response.status_code == 404 and "speculative decoding is off" in response.json()["error"]


def test_admin_route_needs_the_admin_key(app_with_routes):
    client, routes, *_ = app_with_routes
    assert client.post("/v1/speculative/drafter", json={"path": "x"}).status_code == 401
    assert (
        client.post("/v1/speculative/drafter", json={"path": "x"}, headers={"X-Admin-Key": "no"}).status_code
        == 403
    )
    wrong_bearer = client.post(
        "/v1/speculative/drafter", json={"path": "x"}, headers={"Authorization": "Bearer no"}
    )
    assert wrong_bearer.status_code == 403
    routes.admin_key = None  # no admin key configured: admin routes are closed
    assert client.post("/v1/speculative/drafter", json={"path": "x"}, headers=ADMIN).status_code == 403
    assert routes.engine_client.calls == []


@pytest.mark.parametrize("path", ["../outside", "/etc", "live/../../outside", "link"])
def test_swap_paths_must_resolve_inside_the_drafters_dir(app_with_routes, tmp_path, path):
    client, routes, drafters, target = app_with_routes
    _drafter_dir(tmp_path, "outside", seed=2)
    (drafters / "link").symlink_to(tmp_path / "outside")
    response = client.post("/v1/speculative/drafter", json={"path": path}, headers=ADMIN)
    assert response.status_code == 403, response.json()
    assert "outside --drafters-dir" in response.json()["error"]
    assert routes.engine_client.calls == []


def test_swap_same_shape_reloads_in_place_and_keeps_stats_per_drafter(app_with_routes):
    client, routes, drafters, target = app_with_routes
    new = make_valid_drafter(drafters, "new", target, seed=3)
    old_name = routes.store.drafter.name
    routes.store.record_step(
        batch_size=1,
        output_tokens=2,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=1,
        accepted_per_position=[1, 0],
    )
    response = client.post("/v1/speculative/drafter", json={"path": "new"}, headers=ADMIN)
    assert response.status_code == 200, response.json()
    assert routes.engine_client.calls == [("lk_reload_drafter", (str(new),))]
    assert routes.store.drafter.name == str(new)
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
    )
    assert client.get("/v1/speculative/stats", params={"drafter": old_name}).json()["accepted_tokens"] == 1
    assert client.get("/v1/speculative/stats", params={"drafter": str(new)}).json()["accepted_tokens"] == 2
    assert set(client.get("/v1/speculative/stats").json()["drafters"]) == {old_name, str(new)}


def test_bad_swaps_are_4xx_and_the_old_drafter_keeps_serving(app_with_routes):
    client, routes, drafters, target = app_with_routes
    make_valid_drafter(drafters, "wider", target, intermediate_size=256)
    make_valid_drafter(drafters, "other_arch", target, architecture="medusa", num_heads=2)
    nan = make_valid_drafter(drafters, "nan", target, seed=2)
    weights = load_file(str(nan / "model.safetensors"))
    weights["fc.weight"][0, 0] = float("nan")  # same tensors and shapes: only validate's checks see it
    save_file(weights, str(nan / "model.safetensors"))
    (drafters / "empty").mkdir()
    live = routes.store.drafter.name
    cases = {
        "wider": (409, "intermediate_size"),
        "other_arch": (409, "architectures"),
        "nan": (400, "fails validation: drafter"),
        "empty": (400, "no config.json"),
        "missing": (404, "not found"),
        "live": (409, "already the live drafter"),
    }
    for path, (status, reason) in cases.items():
        response = client.post("/v1/speculative/drafter", json={"path": path}, headers=ADMIN)
        assert response.status_code == status, (path, response.json())
        assert reason in response.json()["error"], (path, response.json())
    assert client.post("/v1/speculative/drafter", content=b"{bad", headers=ADMIN).status_code == 400
    assert client.post("/v1/speculative/drafter", json={"paths": "x"}, headers=ADMIN).status_code == 400
    assert routes.engine_client.calls == [] and routes.store.drafter.name == live


def test_swap_refuses_a_drafter_trained_for_another_target(app_with_routes, tmp_path):
    client, routes, drafters, target = app_with_routes
    served = tmp_path / "target"
    served.mkdir()
    (served / "config.json").write_text(json.dumps({"vocab_size": 32}))
    routes.target = str(served)
    other = make_valid_drafter(drafters, "other_target", target, seed=4)
    (other / "lk_training.json").write_text(json.dumps({"target": {"fingerprint": "0000000000000000"}}))
    response = client.post("/v1/speculative/drafter", json={"path": "other_target"}, headers=ADMIN)
    assert response.status_code == 409 and "trained for target 0000000000000000" in response.json()["error"]


def _scrape(store) -> str:
    """What /metrics shows of the lk collector for this store."""
    from prometheus_client import CollectorRegistry, generate_latest

    from lk_vllm.plugin.server.routes import LkCollector

    registry = CollectorRegistry()
    registry.register(LkCollector(store))
    return generate_latest(registry).decode()


def test_metrics_collector_reports_the_window(app_with_routes):
    _, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=2,
        num_draft_tokens=4,
        num_accepted_tokens=3,
        accepted_per_position=[2, 1],
    )
    text = _scrape(routes.store)
    assert "lk_acceptance_length 2.5" in text
    assert 'lk_acceptance_length_aggregated{aggregation="pooled",sampling="all"} 2.5' in text
    assert 'lk_per_position_acceptance{position="0"} 1.0' in text
    assert 'lk_per_position_acceptance{position="1"} 0.5' in text
    assert "lk_speedup NaN" in text  # no baseline: not a number rather than a made-up one


def test_dashboard_uses_only_local_files(app_with_routes):
    client, *_ = app_with_routes
    page = client.get("/dashboard")
    assert page.status_code == 200 and "<svg" in page.text
    for name in ("dashboard.js", "dashboard.css"):
        response = client.get(f"/dashboard/static/{name}")
        assert response.status_code == 200
    assert client.get("/dashboard/static/..%2Froutes.py").status_code == 404
    for path in (ROOT / "lk_vllm" / "plugin" / "server" / "static").iterdir():
        urls = re.findall(r"https?://[^\s\"')]+", path.read_text())
        assert urls in ([], ["http://www.w3.org/2000/svg"]), (path.name, urls)


# ------------------------------------------------------------------------------------------------ launcher input
@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """A tiny target and an EAGLE-3 drafter for it that pass `lk-vllm validate`'s static checks (serve runs them)."""
    from train_helpers import make_tiny_target

    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    root = tmp_path_factory.mktemp("servable")
    target = TargetModel(make_tiny_target(root / "target"))
    drafter = create_drafter("eagle3", target).save_pretrained(root / "d", target=target_info(target))
    return Path(target.path), drafter


@pytest.mark.vllm
def test_serve_command_is_vllms_server_with_faithful_sampling(tmp_path, monkeypatch, servable):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serving import launcher

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    target, drafter = servable
    args = serve_args(
        target,
        "--speculative-config",
        json.dumps({"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 2}),
        "--api-key",
        "k",
        "--admin-key",
        "a",
        "--drafters-dir",
        str(tmp_path),
        "--port",
        "9",
        "--",
        "--max-num-batched-tokens",
        "512",
    )
    command = launcher.build_server_command(args)
    assert command.argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(command.argv[3:])
    assert parsed.model == str(target) and parsed.port == 9 and parsed.max_num_batched_tokens == 512
    assert parsed.speculative_config["draft_sample_method"] == "probabilistic"
    assert parsed.speculative_config["rejection_sample_method"] == "standard"
    assert parsed.per_request_spec_decode_metrics == "summary"
    assert "k" not in command.argv and "a" not in command.argv  # secrets go through the environment
    assert command.env["VLLM_API_KEY"] == "k" and command.env["LK_VLLM_ADMIN_KEY"] == "a"
    assert command.env["VLLM_PLUGINS"] == "lk_general,lk_stats,lk_endpoints"
    ngram = launcher.build_server_command(
        serve_args(target, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    )
    spec = json.loads(ngram.argv[ngram.argv.index("--speculative-config") + 1])
    assert spec == {"method": "ngram", "num_speculative_tokens": 3, "rejection_sample_method": "standard"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speculative-config", "{bad"], "--speculative-config: expected a JSON object, got invalid JSON"),
        (["--speculative-config", "[1]"], "expected a JSON object, got list"),
        (["--speculative-config", '{"method": "ngram"}'], "expected num_speculative_tokens"),
        (
            [
                "--speculative-config",
                '{"method": "eagle3", "model": "/no/such/dir", "num_speculative_tokens": 1}',
            ],
            "drafter model directory /no/such/dir not found",
        ),
        (
            [
                "--speculative-config",
                '{"method": "ngram", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic"}',
            ],
            "does not preserve the target's distribution",
        ),
        (["--drafter", "/no/such/drafter"], "--drafter /no/such/drafter: directory not found"),
        (["--drafter", "DRAFTER", "--num-speculative-tokens", "0"], "expected an integer >= 1"),
        (["--baseline-profile", "/no/profile.json"], "/no/profile.json: file not found"),
        (["--drafters-dir", "/no/dir"], "--drafters-dir /no/dir: directory not found"),
    ],
)
def test_bad_serve_input_is_one_line_user_error(tmp_path, argv, message):
    from serving import launcher

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    argv = [str(_drafter_dir(tmp_path, "dd")) if a == "DRAFTER" else a for a in argv]
    with pytest.raises(UserError) as error:
        launcher.build_server_command(serve_args(target, *argv))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_drafter_for_another_target_is_refused(tmp_path):
    from lk_vllm.drafters import check_drafter_for_target

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    other_vocab = _drafter_dir(tmp_path, "other_vocab", extra={"vocab_size": 64})
    with pytest.raises(UserError, match="vocabulary of 64 tokens, but the target .* has 32"):
        check_drafter_for_target(other_vocab, str(target))
    fingerprinted = _drafter_dir(tmp_path, "fp")
    (fingerprinted / "lk_training.json").write_text(
        json.dumps({"target": {"fingerprint": "feedfeedfeedfeed", "path": "/elsewhere"}})
    )
    with pytest.raises(UserError, match="trained for target fingerprint feedfeedfeedfeed"):
        check_drafter_for_target(fingerprinted, str(target))


@pytest.mark.e2e
def test_serve_cli_prints_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lk_vllm.cli",
            "serve",
            "--target",
            str(tmp_path),
            "--speculative-config",
            "{oops",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "lk-vllm serve: error:" in lines[0]


def test_a_positional_target_still_works_but_says_it_is_deprecated(capsys):
    import argparse

    from serving import calibrate, launcher

    for module in (launcher, calibrate):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(["/models/t"]).target == "/models/t"
        assert "positional TARGET is deprecated; use --target /models/t" in capsys.readouterr().err
        assert parser.parse_args(["--target", "/models/t"]).target == "/models/t"
        assert parser.parse_args([]).target is None
        assert capsys.readouterr().err == ""
        with pytest.raises(SystemExit):
            parser.parse_args(["--target", "/models/a", "/models/b"])
        assert "the target is given twice" in capsys.readouterr().err


def test_calibrate_batch_sizes_input():
    from serving.calibrate import parse_batch_sizes

    assert parse_batch_sizes("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(UserError, match="--batch-sizes"):
            parse_batch_sizes(bad)


@pytest.mark.vllm
def test_serve_calibrates_once_on_first_start_unless_told_not_to(tmp_path, monkeypatch):
    from lk_vllm.plugin.server import speedup
    from serving import launcher

    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    ngram = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    runs = []
    real_run = subprocess.run

    def fake_run(argv, **kwargs):
        if argv[2:4] != ["lk_vllm.cli", "calibrate"]:
            return real_run(argv, **kwargs)
        runs.append(argv)
        key = speedup.profile_key_for_settings(command.settings)
        _profile([(1, 0.1)]).save(speedup.profile_path(key))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(launcher.subprocess, "run", fake_run)
    args = serve_args(target, *ngram)
    command = launcher.build_server_command(args)
    launcher.ensure_calibrated(command, args)
    assert len(runs) == 1 and runs[0][2:6] == ["lk_vllm.cli", "calibrate", "--target", str(target)]
    assert command.env["LK_VLLM_BASELINE_PROFILE"].startswith(str(tmp_path / "home" / "calibration"))
    again = launcher.build_server_command(args)
    launcher.ensure_calibrated(again, args)  # cached now
    for flags in (["--no-calibrate"], []):
        skipped = serve_args(target, *(ngram if flags else []), *flags)
        launcher.ensure_calibrated(
            launcher.build_server_command(skipped), skipped
        )  # no speculation: no baseline
    assert len(runs) == 1


@pytest.mark.vllm
def test_serve_drafter_dir_becomes_an_eagle3_config_with_probabilistic_drafts(tmp_path, servable):
    from serving import launcher

    target, drafter = servable
    command = launcher.build_server_command(serve_args(target, "--drafter", str(drafter)))
    spec = json.loads(command.argv[command.argv.index("--speculative-config") + 1])
    assert spec == {
        "method": "eagle3",
        "model": str(drafter.resolve()),
        "num_speculative_tokens": 3,
        "rejection_sample_method": "standard",
        "draft_sample_method": "probabilistic",
    }
    with pytest.raises(UserError, match="no config.json"):
        (tmp_path / "bare").mkdir()
        launcher.build_server_command(serve_args(target, "--drafter", str(tmp_path / "bare")))


def test_metrics_collector_labels_both_aggregations_and_the_request_histogram(app_with_routes):
    client, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=2,
        output_tokens=26,
        timed=False,
        num_drafts=12,
        num_draft_tokens=24,
        num_accepted_tokens=14,
        accepted_per_position=[9, 5],
        requests=[(10, 10, "temperature_0"), (2, 4, "sampled")],
    )
    text = _scrape(routes.store)
    assert 'lk_acceptance_length_aggregated{aggregation="mean_of_request_means",sampling="all"} 2.5' in text
    assert 'lk_acceptance_length_aggregated{aggregation="pooled",sampling="sampled"} 3.0' in text
    assert 'lk_request_acceptance_length_bucket{le="1.75",sampling="all"} 0.0' in text
    assert 'lk_request_acceptance_length_bucket{le="2.0",sampling="all"} 1.0' in text
    assert 'lk_request_acceptance_length_bucket{le="+Inf",sampling="all"} 2.0' in text
    assert 'lk_request_acceptance_length_sum{sampling="all"} 5.0' in text
    body = client.get("/v1/speculative/stats").json()
    assert body["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    assert {"aggregation", "sampling", "value", "source"} <= set(body["acceptance_lengths"][0])
