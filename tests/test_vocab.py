"""Draft vocabulary selection and vLLM's d2t / t2d forms."""

import pytest
import torch

from lk_vllm.errors import UserError
from lk_vllm.vocab import (
    build_draft_vocab,
    count_tokens,
    from_d2t,
    required_token_ids,
    select_draft_vocab,
    to_d2t,
    to_t2d,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def default_target_tokenizer(default_target):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_target)


def test_most_frequent_tokens_win_and_ties_keep_lower_ids():
    counts = count_tokens([[5, 5, 5, 7, 7, 2], torch.tensor([9, 9, 3])], vocab_size=10)
    assert counts.tolist() == [0, 0, 1, 1, 0, 3, 0, 2, 0, 2]
    # 5 (3), then 7 and 9 (2 each), then 2 and 3 (1 each): the tie at count 1 keeps the lower id 2.
    assert select_draft_vocab(counts, 4).tolist() == [2, 5, 7, 9]


def test_required_tokens_are_always_in():
    counts = torch.tensor([0, 0, 9, 8, 7, 6])
    assert select_draft_vocab(counts, 3, required_ids=[0]).tolist() == [0, 2, 3]


def test_d2t_offset_form_round_trips_and_matches_vllm_rule():
    draft_to_target = torch.tensor([0, 4, 5, 9])
    d2t = to_d2t(draft_to_target)
    assert d2t.tolist() == [0, 3, 3, 6]  # target_id = draft_id + d2t[draft_id]
    assert (torch.arange(4) + d2t).tolist() == draft_to_target.tolist()
    assert from_d2t(d2t).tolist() == draft_to_target.tolist()
    t2d = to_t2d(draft_to_target, 10)
    assert t2d.dtype == torch.bool and t2d.nonzero().flatten().tolist() == [0, 4, 5, 9]


def test_bad_requests_are_user_errors():
    counts = torch.ones(6, dtype=torch.long)
    with pytest.raises(UserError, match="must lie in 1..6"):
        select_draft_vocab(counts, 7)
    with pytest.raises(UserError, match="cannot hold"):
        select_draft_vocab(counts, 1, required_ids=[0, 1])
    with pytest.raises(UserError, match="outside the target vocabulary"):
        count_tokens([[1, 6]], vocab_size=6)


def test_chat_template_and_special_tokens_of_the_default_tokenizer(default_target_tokenizer):
    tokenizer = default_target_tokenizer
    required = required_token_ids(tokenizer)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_start in required and im_end in required
    assert tokenizer.eos_token_id in required
    # Frequent data tokens fill the rest; the special ones are there even though the data never has them.
    data = [tokenizer.encode("hello world " * 20, add_special_tokens=False)]
    wanted = set(required) | set(data[0])
    draft = build_draft_vocab(data, len(tokenizer), len(wanted), tokenizer)
    assert set(draft.tolist()) == wanted
    assert draft.tolist() == sorted(draft.tolist())


def test_auto_size_keeps_small_vocabularies_and_covers_large_ones():
    from lk_vllm.vocab import AUTO_COVERAGE, auto_draft_vocab_size

    assert auto_draft_vocab_size(torch.ones(49152)) == (None, 1.0)  # the default target: the whole vocabulary
    zipf = 1.0 / torch.arange(1, 262145, dtype=torch.float64) ** 1.3  # a 262k vocabulary used like text
    size, covered = auto_draft_vocab_size(zipf)
    cumulative = torch.sort(zipf, descending=True).values.cumsum(0) / zipf.sum()
    assert (
        covered >= AUTO_COVERAGE and float(cumulative[size // 2 - 1]) < AUTO_COVERAGE
    )  # the smallest that covers
    assert auto_draft_vocab_size(torch.ones(262144)) == (65536, 0.25)  # flat counts: the largest candidate
    assert auto_draft_vocab_size(torch.zeros(262144)) == (None, 1.0)  # nothing counted: nothing to choose by
