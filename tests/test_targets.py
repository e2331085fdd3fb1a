"""Targets other than Llama: tiny random Qwen2 and Gemma-3 models (tests/drafter_helpers.py builds them, no
download), each with a drafter trained briefly, exported and served by vLLM, with the acceptance vLLM measures
equal to the trainer's simulation; and the one pair vLLM 0.32 cannot serve (EAGLE-3 on Gemma-3) refused in one
line before any work.

Gemma-3 is the hard case: sliding-window layers, a 262,144-token vocabulary, tied embeddings scaled by
sqrt(hidden), RoPE settings nested per layer type. The tokenizer is the default target's (its ids fit both
vocabularies), so prompts are real chat prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from drafter_helpers import make_target
from train_helpers import FP32_ENGINE, greedy_batch, serve_args

from lk_vllm.drafters import create_drafter, multi_step_loss, target_info
from lk_vllm.errors import UserError

pytestmark = pytest.mark.engine


K = 3
MAX_TOKENS = 24
NUM_PROMPTS = 3


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, default_target):
    return make_target("qwen2", tmp_path_factory.mktemp("qwen2"), default_target)


@pytest.fixture(scope="module")
def qwen2_base(qwen2, tmp_path_factory):
    """The Qwen2 target as a base model: no chat template anywhere in its tokenizer files."""
    base = tmp_path_factory.mktemp("qwen2-base") / "model"
    shutil.copytree(qwen2, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(base)


@pytest.mark.vllm
def test_eagle3_on_gemma3_is_refused_in_one_line_by_every_command(gemma3, tmp_path):
    from lk_vllm.targets import check_target
    from training.config import load_config
    from training.train import train

    with pytest.raises(
        UserError, match=r"cannot serve EAGLE-3 for Gemma3ForCausalLM.*model.architecture=medusa"
    ):
        check_target(gemma3, "eagle3")
    assert check_target(gemma3, "medusa").vocab_size == 262144
    # train refuses before any data work: the data directory named here does not even exist
    config, _ = load_config(
        overrides={
            "model.target": gemma3,
            "model.architecture": "eagle3",
            "data.dirs": [str(tmp_path / "missing")],
            "output": str(tmp_path / "run"),
        }
    )
    with pytest.raises(UserError, match="model.target: vLLM .* cannot serve EAGLE-3"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
def test_serve_and_eval_refuse_an_eagle3_drafter_for_gemma3(gemma3, tmp_path):

    from lk_vllm.target_model import TargetModel
    from serving import launcher
    from training.evaluate import run_eval

    target = TargetModel(gemma3)
    drafter = create_drafter(
        "eagle3", target, draft_to_target=torch.arange(0, 262144, 64), aux_layer_ids=(0, 1, 2)
    )
    directory = drafter.save_pretrained(tmp_path / "e3", target=target_info(target))
    with pytest.raises(UserError, match="--drafter .*: vLLM .* cannot serve EAGLE-3 for Gemma3ForCausalLM"):
        launcher.build_server_command(serve_args(gemma3, "--drafter", str(directory)))
    with pytest.raises(UserError, match="cannot serve EAGLE-3 for Gemma3ForCausalLM"):
        run_eval(str(directory), gemma3, ["mtbench"], 1, "torch", 3, 8, 0.0)


@pytest.mark.vllm
def test_a_base_model_without_chat_template_is_refused_unless_a_template_is_given(qwen2_base):
    from lk_vllm.datasets import chat_prompt_ids, load_tokenizer
    from lk_vllm.targets import check_target

    base = Path(qwen2_base)
    with pytest.raises(UserError, match="has no chat template.*--chat-template"):
        check_target(str(base), "eagle3", needs_chat_template=True)
    tokenizer = load_tokenizer(str(base), "plain")
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "def add(a, b):"}])
    assert tokenizer.decode(ids) == (tokenizer.bos_token or "") + "def add(a, b):"
    chatml = load_tokenizer(str(base), "chatml")
    assert chatml.decode(chat_prompt_ids(chatml, [{"role": "user", "content": "Hi"}])) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(
        UserError, match="--chat-template: expected a Jinja template file or one of chatml, plain"
    ):
        load_tokenizer(str(base), "no-such-template")


# ------------------------------------------------------------------------------- served by vLLM (slow)
def _setup(target_path: str):
    from lk_vllm.datasets import load_prompts
    from lk_vllm.target_model import TargetModel

    target = TargetModel(target_path)
    prompts = load_prompts("mtbench", split="eval", limit=NUM_PROMPTS)
    batch = greedy_batch(target, prompts, MAX_TOKENS + K + 1)
    for continuation in batch["continuations"].values():
        assert len(set(continuation)) > len(continuation) // 4, (
            "a target repeating itself makes any drafter look right"
        )
    return target, prompts, batch


def _train_and_compare(target_path: str, architecture: str, directory: Path, **options):
    """Train on the target's own greedy continuations (so acceptance is far above 1), export, and measure the
    same prompts in the torch simulation and in vLLM."""
    from lk_vllm.bench.runner import evaluate_vllm
    from lk_vllm.drafters import load_drafter
    from training.evaluate import evaluate_torch

    target, prompts, batch = _setup(target_path)
    continuations, sequences = batch["continuations"], batch["sequences"]
    input_ids, mask, loss_mask = batch["input_ids"], batch["mask"], batch["loss_mask"]
    if architecture == "eagle3":
        from lk_vllm.vocab import build_draft_vocab

        options["draft_to_target"] = build_draft_vocab(sequences, target.vocab_size, 1024, target.tokenizer)
    torch.manual_seed(0)
    drafter = create_drafter(architecture, target, **options)
    states = target(input_ids, mask, aux_layer_ids=drafter.aux_layer_ids_needed())
    states.cache_all_logits()
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    drafter.train()
    for _ in range(60):
        out = multi_step_loss(
            drafter.training_steps(states, K),
            states,
            kind="kl",
            draft_to_target=drafter.draft_to_target,
            loss_mask=loss_mask,
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    drafter.eval()
    drafter.save_pretrained(directory, target=target_info(target), training={"loss": "kl", "steps": 60})
    reloaded = load_drafter(directory, target)
    torch_summary = evaluate_torch(
        reloaded, target, prompts, K, MAX_TOKENS, 0.0, continuations=continuations
    )["mtbench"].summary()
    prompt_ids = {"mtbench": [target.chat_prompt_ids(p.messages) for p in prompts]}
    vllm_summary = evaluate_vllm(
        str(directory), target_path, prompt_ids, K, MAX_TOKENS, 0.0, settings_overrides=FP32_ENGINE
    )["mtbench"].summary()
    print(f"{architecture} on {target.config.architectures[0]}: torch {torch_summary}\nvllm {vllm_summary}")
    assert torch_summary["acceptance_length"] > 1.5, "the drafter did not learn: the comparison means nothing"
    assert vllm_summary["acceptance_length"] == pytest.approx(torch_summary["acceptance_length"], rel=0.03)


@pytest.mark.slow
def test_eagle3_on_qwen2_serves_as_the_trainer_predicts(qwen2, tmp_path):
    _train_and_compare(qwen2, "eagle3", tmp_path / "eagle3", aux_layer_ids=(0, 1, 2))


@pytest.mark.slow
def test_medusa_on_gemma3_serves_as_the_trainer_predicts(gemma3, tmp_path):
    _train_and_compare(gemma3, "medusa", tmp_path / "medusa", num_heads=K)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, architecture",
    [("qwen2", "eagle3"), ("qwen2", "medusa"), ("gemma3", "medusa"), ("qwen2_base", "medusa")],
)
def test_prepare_train_export_and_serve_through_the_commands(
    kind, architecture, request, tmp_path, monkeypatch
):
    """The user's path: `train` regenerates data with the target in vLLM (prepare), trains, exports the final
    drafter, and vLLM serves it (acceptance measured on prompts it never saw). The base model (no chat template)
    goes the same way with --chat-template plain."""
    from lk_vllm.drafters import load_drafter
    from training.config import load_config
    from training.evaluate import run_eval
    from training.train import train

    target = request.getfixturevalue(kind)
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    options = {"model.options": {"aux_layer_ids": [0, 1, 2]}} if architecture == "eagle3" else {}
    template = "plain" if kind == "qwen2_base" else None
    config, _ = load_config(
        overrides={
            "model.target": target,
            "model.architecture": architecture,
            "data.datasets": ["gsm8k"],
            "data.limit": 8,
            "data.max_tokens": 16,
            "data.max_length": 192,
            "data.heldout": 2,
            "loss.num_steps": 2,
            "training.max_steps": 3,
            "training.batch_size": 2,
            "training.eval_every": 3,
            "training.log_every": 1,
            "data.chat_template": template,
            "output": str(tmp_path / "run"),
            **options,
        }
    )
    summary = train(config, progress=False)
    final = tmp_path / "run" / "final"
    record = json.loads((final / "lk_training.json").read_text())
    assert record["target"]["architectures"] == [
        {"gemma3": "Gemma3ForCausalLM"}.get(kind, "Qwen2ForCausalLM")
    ]
    assert summary["final"]["expected_acceptance_length"] >= 1.0

    # model.draft_vocab_size=auto: Qwen2's 49,152 ids stay whole; of Gemma-3's 262,144 the smallest size that
    # covers the responses' tokens (a few hundred distinct ones here) is 8192.
    assert load_drafter(final).draft_vocab_size == {"gemma3": 8192}.get(kind, 49152)
    result = run_eval(str(final), target, ["mtbench"], 2, "vllm", 2, 16, 0.0, chat_template=template)
    assert result["num_prompts"] == 2 and result["acceptance_length"] >= 1.0
    assert result["datasets"]["mtbench"]["num_drafts"] > 0  # vLLM drafted with it


@pytest.mark.unit
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
