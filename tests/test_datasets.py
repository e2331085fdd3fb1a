"""The offline dataset registry: sizes, splits, determinism, user JSONL, errors."""

import json

import pytest

from lk_vllm.datasets import dataset_names, load_prompts
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def _assert_well_formed(prompts):
    assert len({p.id for p in prompts}) == len(prompts), "ids must be unique"
    for p in prompts:
        assert p.messages and p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()


def test_registry_names():
    assert set(dataset_names()) >= {"sharegpt", "mtbench", "humaneval", "gsm8k"}


def test_mtbench_has_80_two_turn_questions():
    prompts = load_prompts("mtbench")
    assert len(prompts) == 80
    _assert_well_formed(prompts)
    assert all(len(p.followups) == 1 for p in prompts)


def test_humaneval_has_164_prompts():
    prompts = load_prompts("humaneval")
    assert len(prompts) == 164
    _assert_well_formed(prompts)
    assert "def has_close_elements" in prompts[0].messages[0]["content"]


def test_sharegpt_salvage_and_disjoint_splits():
    train, held_out = load_prompts("sharegpt", "train"), load_prompts("sharegpt", "eval")
    assert 17_000 < len(train) + len(held_out) < 17_700  # of 17,671 salvaged conversations
    assert 200 < len(held_out) < 600
    _assert_well_formed(train)
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert load_prompts("sharegpt", "train", limit=5) == train[:5]


def test_gsm8k_is_deterministic_and_splits_use_disjoint_templates():
    a, b = (
        load_prompts("gsm8k", "train", limit=160, seed=1),
        load_prompts("gsm8k", "train", limit=160, seed=1),
    )
    assert [p.messages for p in a] == [p.messages for p in b]
    c = load_prompts("gsm8k", "train", limit=160, seed=2)
    assert [p.messages for p in a] != [p.messages for p in c]
    held_out = load_prompts("gsm8k", "eval")
    assert len(held_out) == 200
    _assert_well_formed(a + held_out)
    assert all(p.reference and "####" in p.reference for p in a + held_out)
    # Templates are different problems: no eval question's opening words appear among the training ones.
    train_openings = {
        p.messages[0]["content"].split("\n\n")[1].split()[1:4].__str__()
        for p in load_prompts("gsm8k", "train", limit=800)
    }
    eval_openings = {p.messages[0]["content"].split("\n\n")[1].split()[1:4].__str__() for p in held_out}
    assert len(eval_openings - train_openings) > len(eval_openings) // 2


def test_eval_only_datasets_refuse_training_split():
    with pytest.raises(UserError, match="has no 'train' split"):
        load_prompts("mtbench", "train")


def test_unknown_dataset_names_the_choices():
    with pytest.raises(UserError, match="unknown dataset 'nope'.*sharegpt"):
        load_prompts("nope")


def test_user_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {
            "id": "a",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
        },
        {"prompt": "Tell me a joke"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(str(path))
    assert [p.id for p in prompts] == ["a", "mine/2"]
    assert prompts[0].messages[-1] == {"role": "user", "content": "Hi"}  # the answer is regenerated
    assert prompts[1].messages == [{"role": "user", "content": "Tell me a joke"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object, found list"),
        ('{"text": "x"}', r"bad\.jsonl:2: expected a 'messages' list or a 'prompt' string"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"bad\.jsonl:2: 'messages' must be"),
        (
            '{"messages": [{"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            r"bad\.jsonl:2: the conversation must end with a user turn",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_prompts(str(path))


def test_missing_jsonl_and_bad_limit(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "none.jsonl"))
    with pytest.raises(UserError, match="--limit: expected an integer >= 1"):
        load_prompts("mtbench", limit=0)
