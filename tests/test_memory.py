"""The memory estimate (training.memory): it counts the real drafter's parameters, and a run that cannot
fit the GPU is refused in one line."""

from __future__ import annotations

import pytest
import torch
from train_helpers import train_config

from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "architecture,options",
    [("eagle3", {"model.draft_vocab_size": 64}), ("medusa", {}), ("mlp_speculator", {}), ("draft_model", {})],
)
def test_dry_run_counts_the_real_drafters_parameters(tiny, tmp_path, architecture, options):
    from lk_vllm.drafters import create_drafter
    from lk_vllm.target_model import TargetModel
    from training.memory import estimate_memory
    from training.train import drafter_options

    config = train_config(tiny, tmp_path / "run", **{"model.architecture": architecture, **options})
    estimate = estimate_memory(config, tiny[0], "cpu")
    target = TargetModel(tiny[0])
    vocab = (
        {"draft_to_target": torch.arange(64)} if options else {}
    )  # the tiny target has no tokenizer to count
    real = create_drafter(architecture, target, **drafter_options(config, target), **vocab)
    assert estimate.trainable_parameters == sum(p.numel() for p in real.trainable_parameters())
    assert estimate.tokens_per_micro_batch == 4 * 64
    longer = estimate_memory(
        train_config(
            tiny, tmp_path / "run", **{"model.architecture": architecture, **options, "data.max_length": 128}
        ),
        tiny[0],
        "cpu",
    )
    fixed = ("drafter weights + grads + AdamW (fp32)", "target weights (fp32)")
    for name, size in estimate.parts.items():  # everything per token doubles; the weights do not change
        assert longer.parts[name] == size if name in fixed else longer.parts[name] >= 2 * size, name


def test_a_run_that_cannot_fit_the_gpu_is_refused_in_one_line(tiny, tmp_path, monkeypatch):
    import types

    from training.memory import check_fits, estimate_memory

    config = train_config(tiny, tmp_path / "run")
    estimate = estimate_memory(config, tiny[0], "cuda")
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=1000)
    )
    with pytest.raises(
        UserError, match=r"^training\.batch_size=4 x data\.max_length=64 needs about .* GB per GPU"
    ):
        check_fits(estimate, config, torch.device("cuda", 0))
    check_fits(estimate, config, torch.device("cpu"))  # the CPU is not checked
