"""The engine-core worker methods (lk_vllm.plugin.engine.worker) on fakes, no engine: they never replace
a vLLM method, and the in-place drafter reload finds the drafter in every proposer layout of vLLM 0.32."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.vllm


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
