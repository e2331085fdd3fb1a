"""The training config (training.config): recipes validate, overrides apply, flags generated from the
fields, mistakes are one-line errors."""

from __future__ import annotations

import argparse

import pytest
from train_helpers import train_args, train_config

from lk_vllm.errors import UserError
from training.config import Config, differing_fields, load_config, recipe_names
from training.train import add_arguments, config_from_args

pytestmark = pytest.mark.unit


def test_paper_defaults():
    config = Config()
    assert config.loss.gamma == 0.8 and config.loss.num_steps == 6 and config.loss.eta == 3.0
    assert config.optimizer.betas == (0.9, 0.95) and config.optimizer.lr == 4e-4
    assert config.optimizer.grad_clip == 0.5 and config.optimizer.warmup_steps == 100


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_validates(name):
    config, recipe = load_config(recipe=name)
    assert recipe == name
    assert config.training.batch_size >= 1


def test_required_recipes_exist():
    required = {
        "smoke-eagle3",
        "smoke-medusa",
        "smoke-mlp",
        "smoke-draft",
        "smollm2-eagle3",
        "smollm2-medusa",
        "smollm2-mlp",
        "llama31-8b-eagle3",
        "llama31-8b-medusa",
        "llama31-8b-mlp",
        "llama33-70b-eagle3",
    }
    assert required <= set(recipe_names())


@pytest.mark.parametrize(
    "name,architecture,eta",
    [
        ("llama31-8b-eagle3", "eagle3", 3.0),
        ("llama31-8b-medusa", "medusa", 10.0),
        ("llama31-8b-mlp", "mlp_speculator", 3.0),
        ("llama33-70b-eagle3", "eagle3", 3.0),
    ],
)
def test_llama_recipes_have_the_paper_hyper_parameters(name, architecture, eta):
    config, _ = load_config(recipe=name)
    assert (
        config.model.architecture,
        config.loss.kind,
        config.loss.eta,
        config.loss.num_steps,
        config.loss.gamma,
    ) == (architecture, "lambda", eta, 6, 0.8)
    assert (
        config.optimizer.lr,
        config.optimizer.betas,
        config.optimizer.warmup_steps,
        config.optimizer.grad_clip,
    ) == (4e-4, (0.9, 0.95), 100, 0.5)
    assert config.training.batch_size == 64 and config.data.max_length == 8192


def test_medusa_recipes_use_eta_10():
    for name in ("smoke-medusa", "smollm2-medusa", "llama31-8b-medusa"):
        assert load_config(recipe=name)[0].loss.eta == 10.0


def test_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {architecture: medusa}\nloss: {kind: alpha}\n")
    config, name = load_config(config_file=path)
    assert (name, config.model.architecture, config.loss.kind) == ("mine", "medusa", "alpha")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer.learning_rate": 1.0}, "optimizer.learning_rate: Extra inputs are not permitted"),
        ({"loss.kind": "js"}, "loss.kind"),
        ({"loss.gamma": 1.5}, "loss.gamma"),
        ({"training.batch_size": 0}, "training.batch_size"),
        ({"model.architecture": "hydra"}, "model.architecture"),
        ({"model.architecture": "draft_model", "model.draft_vocab_size": 100}, "draft_vocab_size"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="no such recipe"):
        load_config(recipe="nope")
    with pytest.raises(UserError, match="file not found"):
        load_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(config_file=bad)
    with pytest.raises(UserError, match="SECTION.FIELD=VALUE"):
        config_from_args(train_args("--set", "optimizer.lr"))


def test_differing_fields_ignore_harmless_changes():
    saved = Config().model_dump(mode="json")
    changed = Config(output="/elsewhere")
    changed.training.eval_every = 7
    assert differing_fields(saved, changed) == []
    changed.loss.kind = "kl"
    changed.model.architecture = "medusa"
    assert differing_fields(saved, changed) == [
        "loss.kind: 'lambda' -> 'kl'",
        "model.architecture: 'eagle3' -> 'medusa'",
    ]


def test_architecture_options_are_the_drafters_own_keyword_arguments():
    import inspect

    from lk_vllm.drafters import drafter_class
    from training.config import ARCHITECTURE_OPTIONS

    per_draft_position = {
        "num_heads",
        "n_predict",
    }  # None in the config: one per draft position (loss.num_steps)
    for architecture, options in ARCHITECTURE_OPTIONS.items():
        parameters = inspect.signature(drafter_class(architecture).from_target).parameters
        accepted = {
            name: p.default
            for name, p in parameters.items()
            if p.kind is p.KEYWORD_ONLY and name != "draft_to_target"
        }
        assert set(options.model_fields) == set(accepted), architecture
        for name, field in options.model_fields.items():
            if name not in per_draft_position:
                assert field.default == accepted[name], (architecture, name)


def test_unknown_or_bad_architecture_options_are_refused_in_one_line():
    with pytest.raises(
        UserError,
        match=r"model.options for eagle3: aux_layer_idz: Extra inputs are not permitted "
        r"\(it takes aux_layer_ids, intermediate_size, norm_before_residual\)",
    ):
        load_config(overrides={"model.options": {"aux_layer_idz": [1, 2, 3]}})
    with pytest.raises(
        UserError, match="model.options for medusa: num_heads: Input should be greater than or equal"
    ):
        load_config(overrides={"model.architecture": "medusa", "model.options": {"num_heads": 0}})


# ------------------------------------------------------------------------------ flags generated from the fields
def _prepare_args(*argv):
    from training import prepare

    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser, parser.parse_args(list(argv))


def test_every_data_field_is_documented_and_prepare_has_a_flag_for_each_generated_one():
    from training.config import DataSection
    from training.prepare import PREPARE_FLAGS

    assert all(info.description for info in DataSection.model_fields.values())
    # dirs, heldout and the eval fields are the trainer's (what to read, hold out, evaluate on); every field
    # that decides the prepared data is one of prepare's flags
    assert set(PREPARE_FLAGS) == set(DataSection.model_fields) - {
        "dirs",
        "eval_dirs",
        "eval_datasets",
        "eval_limit",
        "heldout",
    }


def test_prepare_flags_parse_into_the_data_section_with_its_defaults():
    from training.config import DataSection, section_from_flags
    from training.prepare import PREPARE_FLAGS

    _, args = _prepare_args(
        "--dataset", "sharegpt", "--dataset", "gsm8k", "--top-p", "0.5", "--data-seed", "7"
    )
    data = section_from_flags(args, DataSection, PREPARE_FLAGS)
    assert data.datasets == ["sharegpt", "gsm8k"]
    assert (data.top_p, data.seed) == (0.5, 7)
    default = DataSection()
    assert (data.temperature, data.max_tokens, data.max_length, data.limit) == (
        default.temperature,
        default.max_tokens,
        default.max_length,
        default.limit,
    )


def test_generated_help_carries_the_description_and_the_default():
    from training.config import DataSection

    parser, _ = _prepare_args("--dataset", "x")
    text = " ".join(parser.format_help().split())
    assert (
        f"{DataSection.model_fields['temperature'].description} (default {DataSection().temperature!r})"
        in text
    )
    assert "(default ['sharegpt']; repeatable)" in text
    train = argparse.ArgumentParser()
    add_arguments(train)
    text = " ".join(train.format_help().split())
    assert (
        "LK^lambda's decay eta (loss.eta)" in text
    )  # train's flags override the recipe, so they name its field


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--top-p", "1.5"), "--top-p: Input should be less than or equal to 1 (found 1.5)"),
        (("--limit", "0"), "--limit: Input should be greater than or equal to 1 (found 0)"),
        (("--temperature", "-1"), "--temperature: Input should be greater than or equal to 0"),
        (("--max-length", "4"), "--max-length: Input should be greater than or equal to 8"),
    ],
)
def test_a_bad_generated_flag_is_a_one_line_error_naming_it(argv, message):
    from training.config import DataSection, section_from_flags
    from training.prepare import PREPARE_FLAGS

    _, args = _prepare_args("--dataset", "sharegpt", *argv)
    with pytest.raises(UserError) as info:
        section_from_flags(args, DataSection, PREPARE_FLAGS)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_flag_of_the_wrong_type_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit):
        _prepare_args("--dataset", "x", "--max-tokens", "many")
    assert "--max-tokens: invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_args("--loss", "js")
    assert "--loss: invalid choice: 'js'" in capsys.readouterr().err


def test_shard_target_needs_fsdp(tiny, tmp_path):
    with pytest.raises(UserError, match="training.shard_target .* needs training.parallel=fsdp"):
        train_config(tiny, tmp_path / "run", **{"training.shard_target": True})
