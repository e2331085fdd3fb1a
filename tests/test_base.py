"""What every drafter shares (lk_vllm.drafters.base): export checks before anything is written, bf16
export, the drafter files reader and the training record."""

import json

import pytest
import torch
from drafter_helpers import VOCAB, make_eagle3

from lk_vllm.drafters import (
    load_drafter,
    target_info,
)
from lk_vllm.drafters.base import TrainingRecord, read_drafter_files
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------- export checks
def test_export_validates_before_writing(tmp_path, target):
    info = target_info(target)
    existing = tmp_path / "d"
    make_eagle3(target).save_pretrained(existing, target=info)
    before = (existing / "model.safetensors").read_bytes()

    bad_head = make_eagle3(target)
    bad_head.config.head_dim = 48
    with pytest.raises(UserError, match="head size 48"):
        bad_head.save_pretrained(existing, target=info)

    short = make_eagle3(target)
    short.config.max_position_embeddings = 128
    with pytest.raises(UserError, match="max_position_embeddings 128 is below the target's 512"):
        short.save_pretrained(existing, target=info)

    with pytest.raises(UserError, match=r"\[1, 2, 3\] must lie in 0\.\.2"):
        make_eagle3(target).save_pretrained(existing, target={**info, "num_hidden_layers": 2})

    nan = make_eagle3(target)
    with torch.no_grad():
        nan.fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="fc.weight has NaN"):
        nan.save_pretrained(existing, target=info)

    bad_map = make_eagle3(target)
    bad_map.draft_ids[3] = VOCAB + 5
    with pytest.raises(UserError, match="outside the target vocabulary"):
        bad_map.save_pretrained(existing, target=info)

    assert (existing / "model.safetensors").read_bytes() == before  # nothing was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # and no temporary directory is left


def test_export_bf16_writes_one_dtype(tmp_path, target):
    out = make_eagle3(target).save_pretrained(
        tmp_path / "d", target=target_info(target), dtype=torch.bfloat16
    )
    from safetensors.torch import load_file

    dtypes = {t.dtype for t in load_file(str(out / "model.safetensors")).values()}
    assert dtypes == {torch.bfloat16, torch.int64, torch.bool}


def test_drafter_files_reader_and_training_record(tmp_path, target):
    out = make_eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    files = read_drafter_files(out)
    assert files.config == json.loads((out / "config.json").read_text())
    assert files.record.data == json.loads((out / "lk_training.json").read_text())
    assert files.record.target_path == target.path and files.record.target_fingerprint
    assert load_drafter(out).training_info == files.record

    (out / "lk_training.json").unlink()  # a third-party drafter: an empty record, every accessor None / {}
    empty = read_drafter_files(out).record
    assert (empty.target_path, empty.target_fingerprint, empty.loss, empty.aux_layer_ids, empty.training) == (
        None,
        None,
        None,
        None,
        {},
    )
    (out / "lk_training.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"lk_training.json: expected a JSON object, found list$"):
        read_drafter_files(out)
    (out / "lk_training.json").write_text("{oops")
    with pytest.raises(UserError, match=r"lk_training.json: not valid JSON"):
        read_drafter_files(out)
    (out / "config.json").unlink()
    with pytest.raises(
        UserError, match=r"config.json is missing \(expected a drafter checkpoint directory\)"
    ):
        read_drafter_files(out)


@pytest.mark.parametrize(
    "data, loss, ids",
    [
        ({"training": {"loss": "lk_alpha"}, "aux_layer_ids": [1, 2, 3]}, "lk_alpha", [1, 2, 3]),
        (
            {"training": {"loss_kind": "kl", "config": {"model": {"options": {"aux_layer_ids": ["0", 2]}}}}},
            "kl",
            [0, 2],
        ),
        ({"training": "not a section", "target": ["not", "a", "section"]}, None, None),
    ],
)
def test_training_record_accessors(data, loss, ids):
    record = TrainingRecord(data)
    assert (record.loss, record.aux_layer_ids) == (loss, ids)
    assert record.target_path is None and isinstance(record.training, dict)
