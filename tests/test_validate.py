"""``lk-vllm validate`` (the drafter doctor) on hand-made broken checkpoints of a tiny random target (fast), its
gates in ``serve`` and ``train``, and the probe's verdict on given counters. The probe against a real vLLM
engine is the slow test at the end."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import make_tiny_target, serve_args

from lk_vllm.drafters import create_drafter, target_info
from lk_vllm.drafters.base import TrainingRecord
from lk_vllm.errors import UserError
from lk_vllm.target_model import TargetModel
from lk_vllm.validate import ERROR, OK, ProbeSettings, check_drafter, judge_probe, require_valid

pytestmark = pytest.mark.vllm

LAYERS = 8
VOCAB = 256
HIDDEN = 64
AUX = [1, 4, 6]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("target"), vocab=VOCAB, layers=LAYERS)


@pytest.fixture(scope="module")
def target(target_dir):
    return TargetModel(target_dir)


def _eagle3_dir(directory, target, export_format=None):
    drafter = create_drafter("eagle3", target, draft_to_target=torch.arange(0, VOCAB, 2), aux_layer_ids=AUX)
    return drafter.save_pretrained(directory, target=target_info(target), export_format=export_format)


@pytest.fixture
def good(tmp_path, target):
    return _eagle3_dir(tmp_path / "good", target)


def _edit_config(directory, edit):
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def _errors(report):
    return {f.check: f.message for f in report.findings if f.status == ERROR}


def test_a_good_drafter_passes_every_check(good, target_dir):
    report = check_drafter(good, target_dir)
    assert report.ok, report.lines()
    assert [f.check for f in report.findings] == [
        "format",
        "target",
        "aux_layers",
        "fc_width",
        "vocabulary",
        "dtype",
    ]
    assert all(f.status == OK for f in report.findings)
    assert "fingerprint matches" in report.findings[1].message
    assert "as trained" in report.findings[2].message
    record = json.loads((good / "lk_training.json").read_text())
    assert record["aux_layer_ids"] == AUX  # what the check compares config.json with


def test_missing_aux_layer_ids_are_an_error_not_vllms_guess(good, target_dir):
    def drop(config):
        del config["eagle_aux_hidden_state_layer_ids"]
        del config["eagle_config"]

    _edit_config(good, drop)
    report = check_drafter(good, target_dir)
    assert not report.ok
    message = _errors(report)["aux_layers"]
    assert f"guess (2, {LAYERS // 2}, {LAYERS - 3})" in message and f"trained on {AUX}" in message


def test_ids_only_where_the_v1_runner_looks_are_an_error(good, target_dir):
    """lk-vllm's exports before the doctor: vLLM's V2 runner (GPU) never reads eagle_config's list."""
    _edit_config(good, lambda config: config.pop("eagle_aux_hidden_state_layer_ids"))
    message = _errors(check_drafter(good, target_dir))["aux_layers"]
    assert "V2 model runner" in message and "top-level eagle_aux_hidden_state_layer_ids" in message


def test_swapped_aux_layer_ids_differ_from_the_trainers(good, target_dir):
    swapped = [0, 4, 6]  # an off-by-one first layer: loads and serves, with acceptance collapsed

    def swap(config):
        config["eagle_aux_hidden_state_layer_ids"] = swapped
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = swapped

    _edit_config(good, swap)
    message = _errors(check_drafter(good, target_dir))["aux_layers"]
    assert f"names layers {swapped}, but the trainer used {AUX}" in message


def test_repeated_or_out_of_range_aux_layer_ids(good, target_dir):
    def ids(values):
        def edit(config):
            config["eagle_aux_hidden_state_layer_ids"] = values
            config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = values

        return edit

    _edit_config(good, ids([1, 4, 4]))
    assert "distinct" in _errors(check_drafter(good, target_dir))["aux_layers"]
    _edit_config(good, ids([1, 4, 9]))
    assert f"within 0..{LAYERS}" in _errors(check_drafter(good, target_dir))["aux_layers"]


def test_fc_width_is_computed_as_vllm_builds_it(good, target_dir):
    # vLLM sizes fc from num_aux_hidden_states when the config has it: 4 x 64 inputs against a 3 x 64 weight.
    _edit_config(good, lambda config: config.update(num_aux_hidden_states=4))
    message = _errors(check_drafter(good, target_dir))["fc_width"]
    assert "builds fc for 256 inputs" in message and "[64, 192]" in message


@pytest.mark.unit
def test_wrong_vocabulary_and_another_targets_drafter(tmp_path, good):
    other_vocab = make_tiny_target(tmp_path / "vocab320", vocab=VOCAB + 64, layers=LAYERS)
    assert "vocabulary size 256" in _errors(check_drafter(good, other_vocab))["target"]
    retrained = make_tiny_target(tmp_path / "seed7", vocab=VOCAB, layers=LAYERS, seed=7)  # same shapes
    assert "fingerprint" in _errors(check_drafter(good, retrained))["target"]


@pytest.mark.unit
def test_draft_vocabulary_mapping_out_of_range(good, target_dir):
    weights = load_file(str(good / "model.safetensors"))
    weights["d2t"][5] = VOCAB  # draft id 5 -> target id 5 + 256
    save_file(weights, str(good / "model.safetensors"))
    report = check_drafter(good, target_dir)
    assert "outside the target vocabulary" in _errors(report)["format"]


def test_nan_weights(good, target_dir):
    weights = load_file(str(good / "model.safetensors"))
    weights["fc.weight"][0, 0] = float("nan")
    save_file(weights, str(good / "model.safetensors"))
    assert "fc.weight has NaN" in _errors(check_drafter(good, target_dir))["dtype"]


@pytest.mark.unit
def test_truncated_safetensors(good, target_dir):
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    report = check_drafter(good, target_dir)
    assert [f.check for f in report.findings] == ["format"]
    assert "model.safetensors" in report.reason and "corrupt" in report.reason


@pytest.mark.unit
def test_things_that_are_not_drafters(tmp_path, target_dir):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 16)
    assert "expected a drafter checkpoint directory, found a file" in check_drafter(a_file, target_dir).reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json is missing" in check_drafter(empty, target_dir).reason
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    report = check_drafter(tokenizer, target_dir)
    assert "unknown drafter format" in report.reason and "supported formats" in report.reason


def test_a_hand_written_speculators_checkpoint_reports_ok(tmp_path, target, target_dir):
    """The public speculators EAGLE-3 format (as RedHatAI publish): ``midlayer.*`` names, no lk_training.json."""
    reference = create_drafter("eagle3", target, draft_to_target=torch.arange(0, VOCAB, 2), aux_layer_ids=AUX)
    state = {k.replace("layers.0.", "midlayer."): v for k, v in reference.export_state_dict().items()}
    directory = tmp_path / "speculators"
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.1.0.dev13",
        "draft_vocab_size": VOCAB // 2,
        "norm_before_residual": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": AUX,
        "transformer_layer_config": {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
        },
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": 3,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {"name_or_path": "HuggingFaceTB/Some-Target", "architectures": ["LlamaForCausalLM"]},
        },
    }
    (directory / "config.json").write_text(json.dumps(config))
    report = check_drafter(directory, target_dir)
    assert report.ok, report.lines()
    assert "speculators format" in report.findings[0].message
    assert "no target fingerprint recorded" in report.findings[1].message
    # vLLM copies only the top-level ids from a speculators config: without them it guesses.
    del config["eagle_aux_hidden_state_layer_ids"]
    (directory / "config.json").write_text(json.dumps(config))
    assert "guess" in _errors(check_drafter(directory, target_dir))["aux_layers"]


def test_other_architectures_pass(tmp_path, target, target_dir):
    for architecture, options in (
        ("medusa", {"num_heads": 3}),
        ("mlp_speculator", {}),
        ("draft_model", {"num_layers": 1}),
    ):
        out = create_drafter(architecture, target, **options).save_pretrained(
            tmp_path / architecture, target=target_info(target)
        )
        report = check_drafter(out, target_dir)
        assert report.ok, report.lines()
        assert "aux_layers" not in [f.check for f in report.findings]
    medusa = check_drafter(tmp_path / "medusa", target_dir, num_speculative_tokens=4)
    assert "at most 3" in medusa.reason


# ---------------------------------------------------------------------------------------------- gates and CLI
def test_the_command_exits_1_with_json_and_0_when_ok(good, target_dir, capsys):
    from lk_vllm.cli import main

    assert main(["validate", str(good), "--target", target_dir, "--no-probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    _edit_config(good, lambda config: config.pop("eagle_aux_hidden_state_layer_ids"))
    assert main(["validate", str(good), "--target", target_dir, "--no-probe"]) == 1
    out = capsys.readouterr().out
    assert "error   aux_layers" in out and out.strip().splitlines()[-1].startswith("FAILED: ")


def test_serve_refuses_a_drafter_that_fails(good, target_dir):

    from serving import launcher

    command = launcher.build_server_command(serve_args(target_dir, "--drafter", str(good), "--no-calibrate"))
    assert command.speculative_config["method"] == "eagle3"
    _edit_config(good, lambda config: config.pop("eagle_aux_hidden_state_layer_ids"))
    with pytest.raises(UserError, match=r"^--drafter .*: drafter .*V2 model runner.*lk-vllm validate"):
        launcher.build_server_command(serve_args(target_dir, "--drafter", str(good), "--no-calibrate"))
    spec = json.dumps({"method": "eagle3", "model": str(good), "num_speculative_tokens": 2})
    with pytest.raises(UserError, match="^--speculative-config model"):
        launcher.build_server_command(serve_args(target_dir, "--speculative-config", spec, "--no-calibrate"))


def test_train_checks_its_exports(tmp_path, target):
    from lk_vllm.validate import check_exports

    run_dir = tmp_path / "run"
    _eagle3_dir(run_dir / "final", target)
    check_exports(run_dir, 3)  # no best export: only final is checked
    _edit_config(run_dir / "final", lambda config: config.update(num_aux_hidden_states=2))
    with pytest.raises(UserError, match="^exported drafter .*final: .*builds fc for 128 inputs"):
        check_exports(run_dir, 3)


@pytest.mark.unit
def test_require_valid_names_the_flag(tmp_path, target_dir):
    with pytest.raises(UserError, match=r"^--drafter .*missing: drafter .*found nothing"):
        require_valid(tmp_path / "missing", target_dir, 3, "--drafter")


# ---------------------------------------------------------------------------------------------- the probe's verdict
def _summary(p0, drafts=40):
    return {
        "num_drafts": drafts,
        "per_position_acceptance": [p0, p0 / 2, p0 / 4],
        "acceptance_length": 1 + p0 * 1.75,
    }


def _record(top1):
    return TrainingRecord({"training": {"heldout": {"top1_agreement": [top1, 0.3, 0.2]}}})


@pytest.mark.unit
@pytest.mark.parametrize(
    "p0, record, verdict, words",
    [
        (0.55, _record(0.6), OK, "prediction is 0.600 (held-out training samples)"),
        (0.05, TrainingRecord(), ERROR, "below the floor --min-acceptance 0.1"),
        (0.2, _record(0.6), ERROR, "far below the trainer's prediction 0.600 (held-out training samples)"),
        (0.35, _record(0.6), OK, "acceptance length"),
        (0.3, TrainingRecord(), OK, "position-0 acceptance 0.300 over 40 drafts"),
    ],
)
def test_probe_verdict(p0, record, verdict, words):
    finding = judge_probe(_summary(p0), record, ProbeSettings())
    assert finding.status == verdict and words in finding.message


@pytest.mark.unit
def test_probe_is_judged_against_the_eval_data_of_its_dataset():
    eval_data = [
        {
            "name": "eval-mt",
            "temperature": 0.0,
            "datasets": ["mtbench"],
            "positions": 90,
            "top1_agreement": [0.3],
        }
    ]
    record = TrainingRecord({"training": {"heldout": {"top1_agreement": [0.6]}, "eval_data": eval_data}})
    finding = judge_probe(_summary(0.25), record, ProbeSettings())
    assert finding.status == OK and "prediction is 0.300 (eval data eval-mt)" in finding.message
    finding = judge_probe(_summary(0.25), record, ProbeSettings(dataset="gsm8k"))  # none for gsm8k: held out
    assert finding.status == ERROR and "far below the trainer's prediction 0.600" in finding.message


@pytest.mark.unit
def test_probe_without_drafts_and_bad_flags():
    assert (
        "made no drafts"
        in judge_probe(
            {"num_drafts": 0, "per_position_acceptance": None}, TrainingRecord(), ProbeSettings()
        ).message
    )
    with pytest.raises(UserError, match=r"--min-acceptance: expected a rate in \[0, 1\], found 1.5"):
        ProbeSettings(min_acceptance=1.5)
    with pytest.raises(
        UserError, match=r"--min-fraction-of-prediction: expected a fraction in \(0, 1\], found 0"
    ):
        ProbeSettings(min_fraction_of_prediction=0.0)
    with pytest.raises(UserError, match="--probe-prompts"):
        ProbeSettings(prompts=0)


# ---------------------------------------------------------------------------------------------- the probe in vLLM
@pytest.mark.engine
@pytest.mark.slow
def test_the_probe_refuses_an_untrained_drafter_in_a_real_engine(tmp_path, default_target):
    """Static checks pass (the checkpoint is well-formed), but the head was never trained: only serving shows it."""
    from lk_vllm.validate import validate

    target = TargetModel(default_target)
    prediction = {"heldout": {"top1_agreement": [0.6, 0.45, 0.35]}}  # what a trainer would have claimed
    out = create_drafter("eagle3", target).save_pretrained(
        tmp_path / "untrained", target=target_info(target), training=prediction
    )
    del target
    report = validate(out, default_target, 3, ProbeSettings(prompts=2, max_tokens=24))
    print("\n".join(report.lines()))
    assert [f.status for f in report.findings[:-1]] == [OK] * 6
    assert report.probe["num_drafts"] > 0 and report.findings[-1].check == "probe"
    assert not report.ok, report.lines()
    assert "position-0 acceptance" in report.reason


def test_lk_vllm_train_runs_the_static_checks_on_its_exports(tmp_path, monkeypatch, capsys):
    from train_helpers import make_tiny_data

    from lk_vllm.cli import main

    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    target = make_tiny_target(tmp_path / "target", vocab=VOCAB, layers=LAYERS)
    data = make_tiny_data(tmp_path / "data", target, num_samples=12, vocab=VOCAB)
    settings = {
        "data.heldout": 2,
        "data.max_length": 64,
        "training.batch_size": 2,
        "training.max_steps": 2,
        "training.eval_every": 2,
        "training.eval_batch_size": 2,
        "loss.num_steps": 2,
    }
    argv = ["train", "--target", target, "--data", data, "--output", str(tmp_path / "run"), "--no-progress"]
    assert main(argv + [f"--set={key}={value}" for key, value in settings.items()]) == 0
    err = capsys.readouterr().err
    assert f"validated {tmp_path / 'run' / 'final'}: static checks passed" in err
    assert f"validated {tmp_path / 'run' / 'best'}: static checks passed" in err
