"""The training config: recipes validate, overrides apply, mistakes are one-line errors."""

from __future__ import annotations

import argparse

import pytest

from lk_vllm.errors import UserError
from training.config import Config, differing_fields, load_config, recipe_names
from training.train import add_arguments, config_from_args


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


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


@pytest.mark.parametrize("name,architecture,eta", [("llama31-8b-eagle3", "eagle3", 3.0),
                                                    ("llama31-8b-medusa", "medusa", 10.0),
                                                    ("llama31-8b-mlp", "mlp_speculator", 3.0),
                                                    ("llama33-70b-eagle3", "eagle3", 3.0)])
def test_llama_recipes_have_the_paper_hyper_parameters(name, architecture, eta):
    config, _ = load_config(recipe=name)
    assert (config.model.architecture, config.loss.kind, config.loss.eta, config.loss.num_steps,
            config.loss.gamma) == (architecture, "lambda", eta, 6, 0.8)
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


def test_flags_and_set_override_the_recipe(tmp_path):
    args = _args(
        "--recipe",
        "smoke-eagle3",
        "--loss",
        "kl",
        "--eta",
        "5",
        "--data",
        "/d1",
        "--data",
        "/d2",
        "--output",
        str(tmp_path),
        "--set",
        "optimizer.lr=1e-3",
        "--set",
        "optimizer.betas=[0.8, 0.9]",
        "--set",
        "model.options={aux_layer_ids: [1, 2, 3]}",
    )
    config, name = config_from_args(args)
    assert name == "smoke-eagle3"
    assert config.loss.kind == "kl" and config.loss.eta == 5.0
    assert config.data.dirs == ["/d1", "/d2"] and config.output == str(tmp_path)
    assert config.optimizer.lr == 1e-3 and config.optimizer.betas == (0.8, 0.9)
    assert config.model.options == {"aux_layer_ids": [1, 2, 3]}
    assert config.model.architecture == "eagle3"  # untouched fields keep the recipe's value


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
        config_from_args(_args("--set", "optimizer.lr"))


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


def test_print_config(capsys):
    from training.train import run

    assert run(_args("--recipe", "smoke-mlp", "--print-config")) == 0
    out = capsys.readouterr().out
    assert "architecture: mlp_speculator" in out


def test_architecture_options_are_the_drafters_own_keyword_arguments():
    import inspect

    from lk_vllm.drafters import drafter_class
    from training.config import ARCHITECTURE_OPTIONS

    per_draft_position = {"num_heads", "n_predict"}  # None in the config: one per draft position (loss.num_steps)
    for architecture, options in ARCHITECTURE_OPTIONS.items():
        parameters = inspect.signature(drafter_class(architecture).from_target).parameters
        accepted = {name: p.default for name, p in parameters.items()
                    if p.kind is p.KEYWORD_ONLY and name != "draft_to_target"}
        assert set(options.model_fields) == set(accepted), architecture
        for name, field in options.model_fields.items():
            if name not in per_draft_position:
                assert field.default == accepted[name], (architecture, name)


def test_unknown_or_bad_architecture_options_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"model.options for eagle3: aux_layer_idz: Extra inputs are not permitted "
                                        r"\(it takes aux_layer_ids, intermediate_size, norm_before_residual\)"):
        load_config(overrides={"model.options": {"aux_layer_idz": [1, 2, 3]}})
    with pytest.raises(UserError, match="model.options for medusa: num_heads: Input should be greater than or equal"):
        load_config(overrides={"model.architecture": "medusa", "model.options": {"num_heads": 0}})
