"""Contenders and plans for the bench tests (lk_vllm.bench): a drafter contender with training's held-out
numbers, and a plan over a few datasets, temperatures and concurrencies (no engine)."""

from __future__ import annotations

from lk_vllm.bench.contenders import Contender
from lk_vllm.bench.runner import Plan
from lk_vllm.bench.workloads import Workload

K = 2
HELDOUT = {"top1_agreement": [0.8, 0.5, 0.4], "per_position_alpha": [0.6, 0.5, 0.2]}


def make_contender(label="e3-lambda", loss="lambda", architecture="eagle3", heldout=HELDOUT) -> Contender:
    return Contender(
        label=label,
        architecture=architecture,
        loss=loss,
        path=f"/runs/{label}",
        speculative_config={
            "method": architecture,
            "num_speculative_tokens": K,
            "draft_sample_method": "probabilistic",
        },
        training={"loss": loss, "heldout": heldout},
    )


def make_plan(datasets=("mtbench", "gsm8k"), temperatures=(0.0, 1.0), concurrencies=(1, 8)) -> Plan:
    workloads = tuple(Workload(name, ((1, 2, 3), (4, 5))) for name in datasets)
    return Plan(workloads, temperatures, concurrencies, num_speculative_tokens=K, max_tokens=16)
