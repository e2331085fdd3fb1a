"""Draft vocabulary selection: which target tokens a truncated-vocabulary drafter (EAGLE-3, Medusa) can propose.

The draft vocabulary is the ``Vd`` most frequent target tokens in the training data (ideally the target's own
regenerated responses), always including the tokenizer's special tokens and the tokens of its chat template,
so the drafter can propose end-of-turn markers. Draft ids are sorted by target id, which keeps the map
monotone. Two forms are used:

* ``draft_to_target`` LongTensor [Vd]: the target id of each draft id (what ``lk_vllm.losses`` takes);
* vLLM's ``d2t`` offset form: ``target_id = draft_id + d2t[draft_id]``; and ``t2d``, a bool mask [V] of the
  target ids in the draft vocabulary (speculators writes it; vLLM ignores it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lk_vllm.errors import UserError


def count_tokens(sequences: Iterable, vocab_size: int) -> torch.Tensor:
    """Token frequencies [V] (int64) over sequences of target token ids (lists or tensors)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for sequence in sequences:
        ids = torch.as_tensor(sequence, dtype=torch.long).flatten()
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise UserError(f"draft vocabulary: token id outside the target vocabulary 0..{vocab_size - 1}")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def required_token_ids(tokenizer) -> list[int]:
    """Special tokens and the tokens the chat template itself emits (role markers, turn ends)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for attribute in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            ids.add(value)
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "x"},
        ]
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
            if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
                rendered = rendered["input_ids"]
            placeholder = set(tokenizer.encode("x", add_special_tokens=False))
            ids.update(int(i) for i in rendered if int(i) not in placeholder)
        except Exception:  # a template that rejects a system turn still has its special tokens above
            pass
    return sorted(ids)


def select_draft_vocab(
    counts: torch.Tensor, draft_vocab_size: int, required_ids: Iterable[int] = ()
) -> torch.Tensor:
    """``draft_to_target`` [Vd]: the required ids plus the most frequent others (ties: lower id), sorted."""
    vocab_size = counts.numel()
    required = sorted(set(int(i) for i in required_ids))
    if not 0 < draft_vocab_size <= vocab_size:
        raise UserError(f"draft vocabulary size {draft_vocab_size} must lie in 1..{vocab_size}")
    if any(not 0 <= i < vocab_size for i in required):
        raise UserError(f"draft vocabulary: required token ids must lie in 0..{vocab_size - 1}")
    if len(required) > draft_vocab_size:
        raise UserError(
            f"draft vocabulary size {draft_vocab_size} cannot hold the {len(required)} special/chat-template tokens"
        )
    scores = counts.double().clone()
    scores[required] = float("inf")
    # Stable descending sort: equal counts keep ascending token id order.
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[:draft_vocab_size]).values


# model.draft_vocab_size=auto: targets up to AUTO_FULL_UP_TO ids keep their whole vocabulary; larger ones (Gemma's
# 262,144, Llama-3's 128,256) take the smallest of AUTO_SIZES whose most frequent ids cover AUTO_COVERAGE of the
# training responses' tokens. On the default target 32,768 ids cover 98.7% of held-out greedy tokens
# (benchmarks/results/draft-vocab.md); a head over the whole of a 262k vocabulary costs 8x that for ~1%.
AUTO_FULL_UP_TO = 65536
AUTO_SIZES = (8192, 16384, 32768, 65536)
AUTO_COVERAGE = 0.98


def auto_draft_vocab_size(counts: torch.Tensor) -> tuple[int | None, float]:
    """(draft vocabulary size, share of the counted tokens its most frequent ids cover); None: the full one."""
    vocab_size, total = counts.numel(), float(counts.sum())
    if vocab_size <= AUTO_FULL_UP_TO or total == 0:
        return None, 1.0
    covered = torch.sort(counts.double(), descending=True).values.cumsum(0) / total
    for size in AUTO_SIZES:
        if covered[size - 1] >= AUTO_COVERAGE:
            return size, float(covered[size - 1])
    return AUTO_SIZES[-1], float(covered[AUTO_SIZES[-1] - 1])


def build_draft_vocab(
    sequences: Iterable, vocab_size: int, draft_vocab_size: int, tokenizer=None
) -> torch.Tensor:
    """Count, add the tokenizer's required tokens, select: ``draft_to_target`` [Vd]."""
    required = required_token_ids(tokenizer) if tokenizer is not None else []
    return select_draft_vocab(count_tokens(sequences, vocab_size), draft_vocab_size, required)


def to_d2t(draft_to_target: torch.Tensor) -> torch.Tensor:
    """vLLM's offset form: ``d2t[d] = target_id(d) - d``."""
    return draft_to_target.long() - torch.arange(draft_to_target.numel())


def from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    return d2t.long() + torch.arange(d2t.numel())


def to_t2d(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool mask [V]: True for target ids that are in the draft vocabulary."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[draft_to_target.long()] = True
    return mask
