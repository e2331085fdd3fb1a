"""The offline dataset registry: sizes, splits, determinism, user JSONL, errors."""

import json

import pytest

import lk_vllm.datasets as datasets
from lk_vllm.datasets import Prompt, dataset_names, load_prompts
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def _assert_well_formed(prompts):
    assert len({p.id for p in prompts}) == len(prompts), "ids must be unique"
    for p in prompts:
        assert p.messages and p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()


def test_registry_names():
    assert set(dataset_names()) >= {"sharegpt", "mtbench", "humaneval", "gsm8k", "code"}


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
    undeduplicated = datasets._load_sharegpt("train", 0)
    assert 17_000 < len(undeduplicated) + len(held_out) < 17_700  # of 17,671 salvaged conversations
    assert 200 < len(held_out) < 600
    assert 14_000 < len(train) < len(undeduplicated) - 1000  # ~2,000 repeated openers ("continue") go
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


def _normalised_turns(prompts):
    return [" ".join(p.messages[-1]["content"].split()).lower() for p in prompts]


@pytest.mark.parametrize("name", ["sharegpt", "gsm8k", "code"])
def test_training_prompts_hold_no_eval_prompt_and_no_repeat(name):
    train = _normalised_turns(load_prompts(name, "train", limit=3000))
    evals = set()
    for eval_name in ("sharegpt", "mtbench", "humaneval", "gsm8k"):
        evals |= set(_normalised_turns(load_prompts(eval_name, "eval")))
    assert len(evals) > 700
    assert not set(train) & evals
    assert len(set(train)) == len(train)


def test_deduplication_keeps_the_first_of_equal_prompts_and_drops_eval_ones(monkeypatch):
    monkeypatch.setattr(datasets, "_eval_texts", lambda: frozenset({"an eval question"}))

    def prompt(id_, text):
        return Prompt(id_, "x", [{"role": "user", "content": text}])

    prompts = [
        prompt("a", "Hello  there"),
        prompt("b", "An eval\nquestion"),
        prompt("c", "hello there"),
        prompt("d", "new"),
    ]
    assert [p.id for p in datasets._deduplicated(prompts)] == ["a", "d"]


def test_code_prompts_are_signature_and_docstring_of_public_stdlib_functions(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "def public(a, b=1):\n"
        '    """Add two numbers and return the sum of them, a long enough docstring."""\n'
        "    return a + b\n\n"
        "def _private(x):\n"
        '    """A private helper that is never a prompt, although its docstring is long."""\n'
        "    return x\n\n"
        "def short(x):\n"
        '    """Too short."""\n'
        "    return x\n\n"
        "class Box:\n"
        "    def method(self,\n"
        "               value):\n"
        '        """Store the value in the box and return the box itself for chaining."""\n'
        "        self.value = value\n"
        "        return self\n"
    )
    (tmp_path / "test" / "test_mod.py").write_text(
        'def public_test():\n    """A test module function with a long docstring, skipped."""\n    return 1\n'
    )
    (tmp_path / "broken.py").write_text("def (:\n")
    found = datasets._stdlib_functions(tmp_path)
    assert [id_ for id_, _, _ in found] == ["code/pkg/mod.py:public", "code/pkg/mod.py:Box.method"]
    assert found[1][1] == (
        "def method(self,\n"
        "           value):\n"
        '    """Store the value in the box and return the box itself for chaining."""\n'
    )
    assert found[0][2].endswith("return a + b")


def test_code_dataset_is_shuffled_by_seed_and_has_no_eval_split():
    a, b = load_prompts("code", "train", limit=50), load_prompts("code", "train", limit=50, seed=1)
    assert len(a) == 50
    _assert_well_formed(a)
    assert a == load_prompts("code", "train", limit=50)
    assert [p.id for p in a] != [p.id for p in b]
    assert all("def " in p.messages[0]["content"] and p.reference for p in a)
    with pytest.raises(UserError, match="dataset 'code' has no 'eval' split"):
        load_prompts("code", "eval")
