"""LK losses under torch.distributed: two gloo ranks on CPU must reproduce one process holding the whole batch.

The documented convention (lk_vllm.losses.lk_loss): statistics are global; each rank's loss is
world_size / N_global * (its own sum), so the mean of the rank losses is the single-process loss and DDP's
averaged parameter gradients are the single-process gradients.
"""

import datetime
import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lk_vllm.losses import KINDS, lk_loss, lk_loss_multi

pytestmark = pytest.mark.unit

WORLD_SIZE = 2
HIDDEN, VOCAB, VOCAB_DRAFT, POSITIONS = 8, 40, 16, 2
# Uneven shards, with rank 1 holding rows whose mask is mostly False: per-rank means would differ from
# the global mean, so only a correct global reduction passes.
SHARDS = [(0, 5), (5, 14)]


def make_problem():
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(POSITIONS, 14, HIDDEN, generator=gen, dtype=torch.float64)
    targets = torch.randn(POSITIONS, 14, VOCAB, generator=gen, dtype=torch.float64) * 2
    masks = torch.rand(POSITIONS, 14, generator=gen) > 0.25
    masks[:, 8:12] = False
    d2t = torch.randperm(VOCAB, generator=gen)[:VOCAB_DRAFT]
    return hidden, targets, masks, d2t


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB_DRAFT, dtype=torch.float64)


def run_case(model, hidden, targets, masks, d2t, kind, rows):
    """Loss of one kind on the given rows; returns (floats, parameter gradients)."""
    start, stop = rows
    model.zero_grad()
    drafts = [model(hidden[k, start:stop]) for k in range(POSITIONS)]
    multi = lk_loss_multi(
        drafts,
        [targets[k, start:stop] for k in range(POSITIONS)],
        kind=kind,
        eta=3.0,
        draft_to_target=d2t,
        masks=[masks[k, start:stop] for k in range(POSITIONS)],
        chunk_size=2,
    )
    multi.loss.backward()
    first = multi.positions[0]
    values = {
        "loss": float(multi.loss.detach()),
        "global_loss": multi.global_loss,
        "alpha": multi.per_position_alpha,
        "lam": multi.per_position_lam,
        "kl": first.kl,
        "tv": first.tv,
        "num_valid": first.num_valid,
        "world_size": first.world_size,
    }
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return values, grads


def worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    hidden, targets, masks, d2t = make_problem()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    results = {}
    for kind in KINDS:
        results[kind] = run_case(model, hidden, targets, masks, d2t, kind, SHARDS[rank])

    # A rank whose shard is fully masked still takes part (lam comes from the other rank's rows).
    gen = torch.Generator().manual_seed(7)
    draft = torch.randn(4, VOCAB_DRAFT, generator=gen, dtype=torch.float64)
    target = torch.randn(4, VOCAB, generator=gen, dtype=torch.float64)
    mask = torch.full((4,), rank == 1)
    one = lk_loss(draft, target, kind="lambda", draft_to_target=d2t, mask=mask)
    results["one_rank_empty"] = {"lam": one.lam, "num_valid": one.num_valid, "loss": float(one.loss.detach())}

    # Bad input on one rank must raise on both (after the collective), not leave the other waiting.
    bad = torch.randn(4, VOCAB_DRAFT, dtype=torch.float64)
    if rank == 1:
        bad[2, 3] = math.nan
    try:
        lk_loss(bad, torch.randn(4, VOCAB, dtype=torch.float64), kind="alpha", draft_to_target=d2t)
        results["bad_input"] = "no error"
    except ValueError as error:
        results["bad_input"] = str(error)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lk_dist")
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(
                "distributed workers did not finish in 180 s (a rank is probably stuck in a collective)"
            )
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process():
    hidden, targets, masks, d2t = make_problem()
    model = make_model()
    return {kind: run_case(model, hidden, targets, masks, d2t, kind, (0, 14)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_match_one_process(rank_results, single_process, kind):
    single_values, single_grads = single_process[kind]
    for rank in range(WORLD_SIZE):
        values, grads = rank_results[rank][kind]
        assert values["world_size"] == WORLD_SIZE
        assert values["num_valid"] == single_values["num_valid"]
        assert values["lam"] == pytest.approx(single_values["lam"], rel=1e-12)
        assert values["alpha"] == pytest.approx(single_values["alpha"], rel=1e-12)
        assert values["kl"] == pytest.approx(single_values["kl"], rel=1e-12)
        assert values["tv"] == pytest.approx(single_values["tv"], rel=1e-12)
        assert values["global_loss"] == pytest.approx(single_values["loss"], rel=1e-12)
        # DDP averaged the gradients over ranks: they must be the single-process gradients.
        for grad, single_grad in zip(grads, single_grads, strict=True):
            torch.testing.assert_close(grad, single_grad, rtol=1e-10, atol=1e-14)
    rank_losses = [rank_results[rank][kind][0]["loss"] for rank in range(WORLD_SIZE)]
    assert sum(rank_losses) / WORLD_SIZE == pytest.approx(single_values["loss"], rel=1e-12)
    assert rank_losses[0] != pytest.approx(rank_losses[1])  # the shards really differ


def test_lambda_differs_per_position_and_from_local_means(rank_results, single_process):
    lams = single_process["lambda"][0]["lam"]
    assert lams[0] != pytest.approx(lams[1])
    # A rank-local mean alpha would have given another lam: the shards have different mean alpha.
    hidden, targets, masks, d2t = make_problem()
    model = make_model()
    local, _ = run_case(model, hidden, targets, masks, d2t, "lambda", SHARDS[0])
    assert local["lam"][0] != pytest.approx(lams[0], rel=1e-6)


def test_rank_with_no_valid_rows_takes_part(rank_results):
    empty, other = rank_results[0]["one_rank_empty"], rank_results[1]["one_rank_empty"]
    assert empty["num_valid"] == other["num_valid"] == 4
    assert empty["lam"] == other["lam"]
    assert empty["loss"] == 0.0


def test_bad_input_on_one_rank_raises_on_every_rank(rank_results):
    for rank in range(WORLD_SIZE):
        message = rank_results[rank]["bad_input"]
        assert "draft_logits is unusable in 1 of 8 valid rows over 2 ranks" in message
    assert "NaN in 1 rows" in rank_results[1]["bad_input"]
    assert "on this rank" not in rank_results[0]["bad_input"]
