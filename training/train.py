"""``lk-vllm train``: train a drafter for a target with an LK (or KL) loss.

The whole loop, in order:

1. config: a recipe (``training/recipes/*.yaml``) or ``--config FILE``, then flags and ``--set`` overrides
   (``training/config.py``);
2. data: ``data.dirs`` (finished ``lk-vllm prepare`` outputs), or the target regenerates ``data.datasets``
   now (``training.prepare.prepare``; cached by settings hash, so later runs reuse it). Samples longer than
   ``data.max_length`` are truncated; ``data.heldout`` samples (chosen by a hash of the prompt id) are kept
   for evaluation, and ``data.eval_dirs`` (e.g. ``prepare --split eval`` of prompts like the served ones) and
   ``data.eval_datasets`` (prepared here at T=0 and T=1 from their eval splits) are only ever evaluated;
3. the drafter (``lk_vllm.drafters.create_drafter``; EAGLE-3 with ``model.draft_vocab_size`` gets the most
   frequent tokens of the training responses as its draft vocabulary), or an exported one loaded from
   ``model.init_from`` (``--init-from``) with its own vocabulary;
4. each step: the global batch of ``training.batch_size`` sequences (a pure function of the step and the
   seed: epoch-wise seeded permutations), split over ranks -> target hidden states (online: the target runs
   under no_grad; offline: read from the cache, ``training/capture.py``) -> ``drafter.training_steps`` (K
   unrolled steps) -> ``sum_k gamma^k * L_k`` with ``lk_vllm.losses`` -> backward -> clip -> AdamW ->
   linear warm-up then cosine schedule;
5. every ``eval_every`` steps and at the end: per-position alpha, expected acceptance length and top-1
   agreement on the held-out samples and on each of ``data.eval_dirs``; the best step by held-out expected
   acceptance length (not loss) is exported to ``RUN/best``, the last one to ``RUN/final`` (vLLM-native,
   ``drafter.save_pretrained``, with the metrics in its ``lk_training.json``);
6. every ``checkpoint_every`` steps: ``RUN/checkpoints/step-N`` (``training/checkpoint.py``); ``--resume``
   continues from the newest one and ends with the same weights as an uninterrupted run.

The code follows that order: ``build_run`` (config, data, target, drafter, parallel wrapper, optimizer, resume)
builds a ``Run`` once; ``train_step`` is one optimizer step; ``evaluate_run``, ``export`` and ``save_checkpoint``
act on the run; ``train`` is the loop over them.

Logs: ``RUN/log.jsonl`` (one JSON object per logged step or evaluation) and TensorBoard event files in
``RUN/tensorboard`` when the ``tensorboard`` package is installed.

Device and precision: ``training.device`` (``auto``: the GPU when one is visible), ``training.precision``
(``auto``: bf16 autocast with fp32 master weights on GPU, fp32 on CPU) and ``training.tf32``
(``training/device.py``); the target, the drafter, every batch and every collective live on that device.

Memory: ``training.grad_accumulation`` splits each step's batch into micro-batches (each micro-batch's
loss is a mean; the step averages them). A step's memory is linear in the sequence length (EAGLE-3's
training-time-test attention runs in blocks; the K draft positions read one shared table of target logits),
``lk-vllm train --dry-run`` prints the estimate per device (``training/memory.py``), and on a GPU a run that
would not fit is refused before anything is loaded.

Distributed: ``torchrun --nproc_per_node N -m lk_vllm.cli train ...`` (or ``torchrun --nproc_per_node N
$(which lk-vllm) train ...``) runs DistributedDataParallel (``training.parallel: ddp``, the default) or FSDP2
(``fsdp``: ``torch.distributed.fsdp.fully_shard``, weights and AdamW moments sharded between steps), gloo on
CPU, NCCL on GPU. Each rank takes every N-th sequence of the global batch. ``lk_vllm.losses`` normalises each
rank's loss by the GLOBAL number of valid positions (times N), so the wrappers' gradient averaging gives
exactly the single-process gradient of the same global batch, and LK^lambda's lambda uses the global mean
alpha. Every rank evaluates its share of the held-out samples (the sums are all-reduced) and hands its shard
to each checkpoint; rank 0 prepares data, logs and writes checkpoints and exports. Checkpoints hold whole
tensors keyed by name, so any layout resumes any other.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import FSDPModule

from lk_vllm.acceptance import expected_acceptance_length
from lk_vllm.assets import lk_home, resolve_target, target_fingerprint
from lk_vllm.atomic import write_atomic
from lk_vllm.drafters import create_drafter, load_drafter, target_info
from lk_vllm.drafters.base import BEST_EXPORT, FINAL_EXPORT
from lk_vllm.errors import UserError
from lk_vllm.log import log
from lk_vllm.losses import lk_loss
from lk_vllm.targets import add_target_argument, check_target
from training import checkpoint as ckpt
from training.capture import OfflineCapture, OnlineCapture, build_cache, cache_key, collate
from training.config import (
    ARCHITECTURE_OPTIONS,
    Config,
    DataSection,
    add_field_flags,
    differing_fields,
    field_values,
    flatten,
    load_config,
    parse_override,
    recipe_names,
)
from training.data import load_manifest, load_samples
from training.device import Placement, resolve_placement


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: torch.device, timeout_minutes: float = 180.0, always: bool = False) -> Dist:
    """torchrun sets WORLD_SIZE/RANK; then join the process group (NCCL when training on GPU, else gloo).
    ``always``: join it with one rank too (FSDP2 builds its device mesh on the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not always:
        return Dist()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size())


# ------------------------------------------------------------------------------------------ data
def ensure_data(config: Config, target_path: str, dist: Dist, progress: bool) -> list[str]:
    """The prepared data directories; the target regenerates each of ``data.datasets`` first if needed, one
    directory per dataset (cached by its settings' hash, so adding a dataset to a recipe regenerates only it)."""
    if config.data.dirs:
        return [str(Path(d).expanduser()) for d in config.data.dirs]
    if not config.data.datasets:
        raise UserError(
            "no training data: pass --data DIR (a finished `lk-vllm prepare` output) or set data.datasets"
        )
    from training.prepare import PrepareSettings

    d = config.data
    outputs = [
        _prepared(PrepareSettings.for_target(target_path, d, datasets=[name]), target_path, d, dist, progress)
        for name in d.datasets
    ]
    dist.barrier()
    return outputs


EVAL_TEMPERATURES = (0.0, 1.0)  # the two temperatures lk-vllm predicts served acceptance at


def ensure_eval_data(config: Config, target_path: str, dist: Dist, progress: bool) -> list[str]:
    """``data.eval_dirs``, then for each of ``data.eval_datasets`` the target's answers to its first
    ``data.eval_limit`` eval-split prompts at each of EVAL_TEMPERATURES (top-p 1), prepared if needed."""
    import dataclasses

    from training.prepare import PrepareSettings

    d = config.data
    outputs = [str(Path(directory).expanduser()) for directory in d.eval_dirs]
    for name in d.eval_datasets:
        settings = PrepareSettings.for_target(target_path, d, datasets=[name], split="eval")
        for temperature in EVAL_TEMPERATURES:
            settings = dataclasses.replace(settings, limit=d.eval_limit, temperature=temperature, top_p=1.0)
            outputs.append(_prepared(settings, target_path, d, dist, progress))
    if d.eval_datasets:
        dist.barrier()
    return outputs


def _prepared(settings, target_path: str, data: DataSection, dist: Dist, progress: bool) -> str:
    """The default output directory of ``settings``, which rank 0 prepares first unless it is finished."""
    from training.prepare import default_output_dir, prepare

    output = default_output_dir(settings)
    if dist.main and not (output / "manifest.json").is_file():
        from lk_vllm import engine

        what = f"{', '.join(settings.datasets)} ({settings.split} split, T={settings.temperature:g})"
        log(f"preparing data: the target regenerates {what} into {output}")
        prepare(
            settings,
            output,
            engine.EngineSettings(model=target_path, max_model_len=max(data.max_length, 256)),
            progress=progress,
        )
    return str(output)


def load_run_samples(dirs: list[str], fingerprint: str, max_length: int):
    """All samples (truncated to ``max_length``), and how many were truncated / left with nothing to learn."""
    samples, truncated, empty = [], 0, 0
    for directory in dirs:
        for sample in load_samples(Path(directory), fingerprint):
            if len(sample.input_ids) > max_length:
                truncated += 1
                sample.input_ids, sample.loss_mask = (
                    sample.input_ids[:max_length],
                    sample.loss_mask[:max_length],
                )
            if sample.loss_mask.sum() < 2:  # a drafter step predicts at least two tokens ahead
                empty += 1
                continue
            samples.append(sample)
    if not samples:
        raise UserError(
            f"--data {', '.join(dirs)}: no sample has generated tokens within data.max_length={max_length}"
        )
    return samples, truncated, empty


def check_training_dirs(dirs: list[str]) -> None:
    """Refuse eval-split data in the training data: the eval sets' prompts would be trained on."""
    for directory in dirs:
        if load_manifest(Path(directory))["settings"].get("split") == "eval":
            raise UserError(
                f"data.dirs: {directory} holds eval-split prompts (prepared with --split eval); training on "
                "them would leak the eval sets: pass it in data.eval_dirs to evaluate on it instead"
            )


@dataclass
class EvalSet:
    """One of ``data.eval_dirs``: evaluated at every evaluation, never trained on."""

    name: str
    directory: str
    temperature: float | None  # of the target's responses (prepare's --temperature); None: not recorded
    datasets: list[str]  # prepare's --dataset names
    indices: list[int]  # into the run's samples


def load_eval_sets(dirs: list[str], samples: list, fingerprint: str, max_length: int) -> list[EvalSet]:
    """Append each eval directory's samples to ``samples``; one EvalSet per directory."""
    sets = []
    for directory in dirs:
        loaded, _, _ = load_run_samples([directory], fingerprint, max_length)
        settings = load_manifest(Path(directory))["settings"]
        temperature = settings.get("temperature")
        sets.append(
            EvalSet(
                name=Path(directory).name,
                directory=directory,
                temperature=None if temperature is None else float(temperature),
                datasets=[Path(name).stem for name in settings.get("datasets", [])],
                indices=list(range(len(samples), len(samples) + len(loaded))),
            )
        )
        samples += loaded
    return sets


def split_heldout(samples, heldout: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): the held-out ones are those with the smallest prompt-id hashes, so
    the split does not depend on shard order or on how many samples there are."""
    order = sorted(
        range(len(samples)), key=lambda i: (hashlib.sha256(samples[i].prompt_id.encode()).hexdigest(), i)
    )
    if heldout >= len(samples):
        raise UserError(f"data.heldout={heldout} leaves no training samples (the data has {len(samples)})")
    held = sorted(order[:heldout])
    held_set = set(held)
    return [i for i in range(len(samples)) if i not in held_set], held


class BatchOrder:
    """Global batch of each step: sequences ``step*B .. step*B+B-1`` of an endless stream of seeded
    per-epoch permutations of the training samples."""

    def __init__(self, train_indices: list[int], batch_size: int, seed: int):
        self.indices, self.batch_size, self.seed = train_indices, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.indices), generator=generator).tolist()}
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        n, out = len(self.indices), []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(self.indices[self._perm(epoch)[offset]])
        return out


# ------------------------------------------------------------------------------------------ model
def drafter_options(config: Config, target) -> dict:
    """The architecture's construction options from the config (the draft vocabulary aside)."""
    options = (
        ARCHITECTURE_OPTIONS[config.model.architecture].model_validate(config.model.options).model_dump()
    )
    for count in ("num_heads", "n_predict"):  # Medusa heads, MLP speculator stages: one per draft position
        if count in options and options[count] is None:
            options[count] = config.loss.num_steps
    return options


def make_drafter(config: Config, target, samples, train_indices):
    if config.model.init_from:
        path = Path(config.model.init_from).expanduser()
        drafter = load_drafter(path, target)  # checks it was made for this target
        if drafter.architecture != config.model.architecture:
            raise UserError(
                f"model.init_from: {path} is a {drafter.architecture} drafter but model.architecture is "
                f"{config.model.architecture}; set --set model.architecture={drafter.architecture}"
            )
        for parameter in drafter.trainable_parameters():
            parameter.requires_grad_(True)
        return drafter.float()  # fp32 master weights, as a fresh drafter's (an export may be bf16)
    options = drafter_options(config, target)
    size = config.model.draft_vocab_size
    if size is not None and size != target.vocab_size:
        from lk_vllm.vocab import auto_draft_vocab_size, count_tokens, required_token_ids, select_draft_vocab

        counts = count_tokens(
            (samples[i].input_ids[samples[i].loss_mask] for i in train_indices), target.vocab_size
        )
        if size == "auto":
            size, covered = auto_draft_vocab_size(counts)
            if size is not None:
                log(
                    f"draft vocabulary: the {size} most frequent of {target.vocab_size} ids, {covered:.1%} of the "
                    "training responses' tokens (model.draft_vocab_size=auto)"
                )
        if size is not None and size < target.vocab_size:
            options["draft_to_target"] = select_draft_vocab(
                counts, size, required_token_ids(target.tokenizer)
            )
    return create_drafter(config.model.architecture, target, **options)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SharedTargetLogits:
    """Wraps TargetStates so the target logits of a position are computed once per batch and read by index by
    all K unrolled steps (step k at anchor t reads position t+k+1: the K steps read nearly the same rows).

    With a draft vocabulary (``draft_to_target``) the table holds only the draft ids' columns and
    ``table_logsumexp`` the full vocabulary's normaliser of each row: all the loss reads of the target."""

    def __init__(self, states, loss_mask: torch.Tensor, draft_to_target: torch.Tensor | None = None):
        self.states = states
        # Positions whose logits predict a response token: every step's target rows lie among them.
        wanted = torch.zeros_like(loss_mask)
        wanted[:, :-1] = loss_mask[:, 1:]
        batch_index, position = wanted.nonzero(as_tuple=True)
        self.lookup = torch.full(loss_mask.shape, -1, dtype=torch.long, device=loss_mask.device)
        self.lookup[batch_index, position] = torch.arange(batch_index.numel(), device=loss_mask.device)
        self.table_logsumexp = None
        if draft_to_target is None:
            self.table = states.logits_at(batch_index, position)
        else:
            self.table, self.table_logsumexp = states.draft_logits_at(batch_index, position, draft_to_target)

    def __getattr__(self, name):
        return getattr(self.states, name)

    def rows_at(self, batch_index, positions) -> torch.Tensor | None:
        """The table rows of these positions (what ``multi_step_loss`` reads), or None if one is not there."""
        rows = self.lookup[batch_index, positions]
        return None if bool((rows < 0).any()) else rows

    def logits_at(self, batch_index, positions, chunk_size: int = 1024):
        rows = self.rows_at(batch_index, positions)
        if (
            rows is None or self.table_logsumexp is not None
        ):  # not in the table, or the table is not full rows
            return self.states.logits_at(batch_index, positions, chunk_size)
        return self.table[rows]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    drafter, capture, samples, indices: list[int], num_steps: int, batch_size: int, dist: Dist | None = None
) -> dict:
    """Held-out per-position alpha (teacher-forced), expected acceptance length, top-1 agreement, KL. With
    ``dist`` each rank evaluates every N-th sample and the sums are all-reduced: every rank returns the same."""
    dist = dist or Dist()
    d2t = drafter.draft_to_target
    alpha_sum, kl_sum, top1, count = ([0.0] * num_steps for _ in range(4))
    mine = indices[dist.rank :: dist.world]
    most = -(-len(indices) // dist.world)  # rank 0's share: the most any rank has
    for start in range(0, most, batch_size):
        if start >= len(mine):  # nothing left here; a sharded target still needs this rank's forward
            capture.idle()
            continue
        batch = collate(samples, mine[start : start + batch_size]).to(capture.device)
        states = capture.states(batch)
        for k, step in enumerate(drafter.training_steps(states, num_steps)):
            draft, target = step.pairs(states, batch.loss_mask)
            if draft.shape[0] == 0:
                continue
            result = lk_loss(draft, target, kind="kl", draft_to_target=d2t, distributed=False)
            guess = draft.argmax(-1)
            guess = guess if d2t is None else d2t[guess]
            n = draft.shape[0]
            alpha_sum[k] += result.alpha * n
            kl_sum[k] += result.kl * n
            top1[k] += int((guess == target.argmax(-1)).sum())
            count[k] += n
    sums = _all_reduce_sum(alpha_sum + kl_sum + top1 + count, dist, capture.device)
    alpha_sum, kl_sum, top1, count = (sums[i * num_steps : (i + 1) * num_steps] for i in range(4))
    count = {k: int(c) for k, c in enumerate(count) if c}
    if not count:
        return {}
    steps = sorted(count)
    alpha = [alpha_sum[k] / count[k] for k in steps]
    agree = [top1[k] / count[k] for k in steps]
    if len(alpha) < num_steps:
        # A draft LM has one teacher-forced distribution for every drafting step (see lk_vllm.drafters).
        alpha += [alpha[-1]] * (num_steps - len(alpha))
        agree += [agree[-1]] * (num_steps - len(agree))
    return {
        "per_position_alpha": [round(a, 6) for a in alpha],
        "expected_acceptance_length": round(expected_acceptance_length(alpha), 6),
        "top1_agreement": [round(a, 6) for a in agree],
        "expected_acceptance_length_greedy": round(expected_acceptance_length(agree), 6),
        "kl": [round(kl_sum[k] / count[k], 6) for k in steps],
        "positions": count[steps[0]],
    }


def evaluate_eval_sets(
    drafter,
    capture,
    samples,
    eval_sets: list[EvalSet],
    num_steps: int,
    batch_size: int,
    dist: Dist | None = None,
) -> list[dict]:
    """The ``eval_data`` entries of ``lk_training.json``: each eval set's description and its ``evaluate``
    metrics."""
    return [
        {
            "name": e.name,
            "dir": e.directory,
            "temperature": e.temperature,
            "datasets": e.datasets,
            "samples": len(e.indices),
            **evaluate(drafter, capture, samples, e.indices, num_steps, batch_size, dist),
        }
        for e in eval_sets
    ]


# ------------------------------------------------------------------------------------------ logging
class Logger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled, self.tb = run_dir / "log.jsonl", enabled, None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop what the interrupted run logged after it
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _scalars(record):
                self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalars(record: dict, prefix: str = ""):
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, dict):  # e.g. eval_data: one entry per directory, by its name
                    yield from _scalars(v, f"{prefix}{key}/{v.get('name', i)}/")
                elif isinstance(v, int | float):
                    yield f"{prefix}{key}/{i}", v
        elif isinstance(value, int | float):
            yield f"{prefix}{key}", value


# ------------------------------------------------------------------------------------------ the run
class _Unroll(torch.nn.Module):
    """What DDP / FSDP2 wrap: its forward is the drafter's K-step unroll (the drafters' ``forward`` is not what
    training calls, so the wrappers' hooks need this one)."""

    def __init__(self, drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, states, num_steps: int):
        return self.drafter.training_steps(states, num_steps)


def parallelize(drafter, parallel: str, placement) -> torch.nn.Module:
    """The module a step calls: the unroll, under DDP when a process group is up (``training.parallel: ddp``),
    or sharded by FSDP2 (``fsdp``: weights, gradients and AdamW moments split over the ranks between steps).

    FSDP2 shards the unroll as one unit: the EAGLE-3 unroll calls its layer's parts rather than a layer
    ``forward`` that FSDP could hook, so every rank holds the whole drafter during a step's forward and
    backward and 1/N of it (and of its optimizer state) the rest of the time. The weights stay gathered after
    the forward because the loss runs the draft heads on its outputs."""
    model = _Unroll(drafter)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, reshard_after_forward=False)
    elif torch.distributed.is_initialized():
        device_ids = [placement.device] if placement.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, broadcast_buffers=False
        )
    return model


@contextlib.contextmanager
def full_weights(model: torch.nn.Module):
    """The drafter's parameters as whole tensors on every rank inside the block (a collective under FSDP2,
    which keeps them sharded between steps; nothing to do otherwise)."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _state_dict_options(**kwargs):
    # Whole tensors keyed by parameter name: a checkpoint of any parallel layout resumes in any other.
    return StateDictOptions(full_state_dict=True, **kwargs)


@dataclass
class Run:
    """Everything a run holds, built once by ``build_run``; ``train_step``, ``evaluate_run``, ``export`` and
    ``save_checkpoint`` act on it."""

    config: Config
    name: str
    placement: Placement
    dist: Dist
    run_dir: Path
    target: object  # lk_vllm.target_model.TargetModel
    fingerprint: str
    data_dirs: list[str]
    samples: list
    train_indices: list[int]
    heldout_indices: list[int]
    eval_sets: list[EvalSet]
    data_key: str
    drafter: torch.nn.Module
    model: torch.nn.Module  # what a step calls: the unroll, under DDP or FSDP2 when distributed
    capture: object  # OnlineCapture | OfflineCapture
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: BatchOrder
    logger: Logger
    start_step: int = 0
    best: dict = field(default_factory=lambda: {"step": None, "expected_acceptance_length": -1.0})

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def _check_parallel(parallel: str) -> None:
    if parallel == "fsdp" and "WORLD_SIZE" not in os.environ:
        raise UserError(
            "training.parallel=fsdp needs torchrun (e.g. torchrun --nproc_per_node N -m lk_vllm.cli "
            "train ...); without it there is one process and nothing to shard: use training.parallel=ddp"
        )


def build_run(config: Config, name: str = "run", resume: bool = False, progress: bool = True) -> Run:
    """Check the config, join the process group, load data, target and drafter, wrap the drafter for the
    parallel layout, and restore a checkpoint when resuming. Raises UserError for anything the user can fix,
    before the slow parts where it can."""
    from lk_vllm.target_model import TargetModel

    t = config.training
    placement = resolve_placement(
        t.device, t.precision, t.tf32
    )  # a bad device fails here, before any loading
    _check_parallel(t.parallel)
    dist = init_distributed(placement.device, t.collective_timeout_minutes, always=t.parallel == "fsdp")
    if t.batch_size % (dist.world * t.grad_accumulation):
        raise UserError(
            f"training.batch_size={t.batch_size} must be a multiple of the {dist.world} rank(s) times "
            f"training.grad_accumulation={t.grad_accumulation}"
        )
    run_dir = Path(config.output or lk_home() / "runs" / name).expanduser().resolve()
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is not None and not resume:
        raise UserError(
            f"{run_dir} already holds checkpoints ({latest.name}); pass --resume to continue it "
            "or choose another --output"
        )
    state = None
    if resume and latest is not None:
        state = ckpt.load_checkpoint(latest)
        differences = differing_fields(state["config"], config)
        if differences:
            raise UserError(
                f"--resume: {latest} was trained with a different config: {'; '.join(differences)}"
            )

    init_from = config.model.init_from
    if (
        init_from and not (Path(init_from).expanduser() / "config.json").is_file()
    ):  # before minutes of data work
        raise UserError(f"model.init_from: {init_from} is not an exported drafter directory (no config.json)")
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    target_path = resolve_target(config.model.target)
    check_target(
        target_path,
        config.model.architecture,
        where="model.target",
        needs_chat_template=bool(config.data.datasets)
        and not (config.data.dirs or config.data.chat_template),
    )
    if placement.device.type == "cuda":
        from training.memory import check_fits, estimate_memory

        check_fits(estimate_memory(config, target_path, "cuda", dist.world), config, placement.device)
    fingerprint = target_fingerprint(target_path)
    data_dirs = ensure_data(config, target_path, dist, progress)
    check_training_dirs(data_dirs)
    samples, truncated, dropped = load_run_samples(data_dirs, fingerprint, config.data.max_length)
    train_indices, heldout_indices = split_heldout(samples, config.data.heldout)
    eval_dirs = ensure_eval_data(config, target_path, dist, progress)
    eval_sets = load_eval_sets(eval_dirs, samples, fingerprint, config.data.max_length)
    data_key = cache_key(fingerprint, data_dirs, (), config.data.max_length, "samples")
    if state is not None and state.get("data_key") != data_key:
        raise UserError(
            f"--resume: the data in {', '.join(data_dirs)} differs from the data {latest} was "
            "trained on (its manifest changed); resume with the original data or start a new run"
        )
    target = TargetModel(
        target_path,
        dtype=placement.target_dtype,
        device=placement.device,
        chat_template=config.data.chat_template,
        shard_layers=t.shard_target,
    )
    drafter = make_drafter(config, target, samples, train_indices).to(placement.device)
    aux_layer_ids = drafter.aux_layer_ids_needed()
    num_params = sum(p.numel() for p in drafter.trainable_parameters())
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log(
            f"{config.model.architecture} drafter, {num_params / 1e6:.1f}M trainable parameters; "
            f"{len(train_indices)} training / {len(heldout_indices)} held-out samples"
            + "".join(f" / {len(e.indices)} in {e.name}" for e in eval_sets)
            + " "
            f"({truncated} truncated to {config.data.max_length} tokens, {dropped} without response tokens); "
            f"loss {config.loss.kind}"
            + (f" eta={config.loss.eta}" if config.loss.kind == "lambda" else "")
            + (f"; starting from {config.model.init_from}" if config.model.init_from else "")
            + f"; {placement.describe()}; {dist.world} rank(s)"
            + (f", {t.parallel}" if dist.world > 1 or t.parallel == "fsdp" else "")
            + ("; target layers sharded" if target.layers_sharded() else "")
            + f"; run directory {run_dir}"
        )

    if t.capture == "offline":
        cache_dir = (
            lk_home()
            / "capture"
            / cache_key(
                fingerprint, data_dirs + eval_dirs, aux_layer_ids, config.data.max_length, t.cache_dtype
            )
        )
        # Every rank captures its share of the shards (the directory must be shared by the ranks).
        manifest = build_cache(
            target,
            samples,
            aux_layer_ids,
            cache_dir,
            t.cache_dtype,
            batch_size=t.eval_batch_size,
            progress=progress and dist.main,
            rank=dist.rank,
            world=dist.world,
            barrier=dist.barrier,
        )
        if dist.main:
            log(
                f"hidden-state cache {cache_dir}: {manifest['bytes'] / 1e6:.1f} MB for {manifest['tokens']} tokens"
            )
        capture = OfflineCapture(target, cache_dir, aux_layer_ids)
    else:
        capture = OnlineCapture(target, aux_layer_ids)

    model = parallelize(drafter, t.parallel, placement)  # FSDP2 replaces the parameters: optimizer after it
    o = config.optimizer
    optimizer = torch.optim.AdamW(
        drafter.trainable_parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, t.max_steps, o.min_lr_ratio)
    )
    start_step, best = 0, {"step": None, "expected_acceptance_length": -1.0}
    if state is not None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if "format" not in state:
            raise UserError(
                f"--resume: {latest} was written by an older lk-vllm (parameters not keyed by name); "
                "start a new run"
            )
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=_state_dict_options(),
        )
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start_step, best = state["step"], state["best"]
        if dist.main:
            log(f"resuming {latest} at step {start_step}")
    elif resume and dist.main:
        log(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    if dist.main:
        write_atomic(run_dir / "config.json", json.dumps(config.model_dump(mode="json"), indent=1))
    return Run(
        config=config,
        name=name,
        placement=placement,
        dist=dist,
        run_dir=run_dir,
        target=target,
        fingerprint=fingerprint,
        data_dirs=data_dirs,
        samples=samples,
        train_indices=train_indices,
        heldout_indices=heldout_indices,
        eval_sets=eval_sets,
        data_key=data_key,
        drafter=drafter,
        model=model,
        capture=capture,
        optimizer=optimizer,
        scheduler=scheduler,
        order=BatchOrder(train_indices, t.batch_size, t.seed),
        logger=Logger(run_dir, dist.main, start_step if state is not None else None),
        start_step=start_step,
        best=best,
    )


# ------------------------------------------------------------------------------------------ one step
def micro_batch_loss(model, drafter, states, loss_mask: torch.Tensor, loss, placement) -> dict:
    """One micro-batch's K-step loss, as the trainer computes it: ``model`` (the drafter, or its DDP/FSDP
    wrapper) unrolls ``loss.num_steps`` steps under the placement's autocast, and the K steps read one shared
    table of target logits. Returns ``multi_step_loss``'s dict."""
    from lk_vllm.drafters import multi_step_loss

    shared = SharedTargetLogits(states, loss_mask, drafter.draft_to_target)
    with placement.autocast():
        return multi_step_loss(
            model(shared, loss.num_steps),
            shared,
            kind=loss.kind,
            eta=loss.eta,
            draft_to_target=drafter.draft_to_target,
            loss_mask=loss_mask,
            gamma=loss.gamma,
            chunk_size=loss.chunk_size,
        )


def _all_reduce_sum(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    if dist.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def train_step(run: Run, step: int) -> dict:
    """One optimizer step on the global batch of ``step`` (this rank's share of each micro-batch); returns the
    step's loss (mean over ranks), per-position alpha and lambda, gradient norm and token count."""
    t, dist = run.config.training, run.dist
    global_indices = run.order.global_batch(step)
    run.drafter.train()
    run.optimizer.zero_grad(set_to_none=True)
    chunk = t.batch_size // t.grad_accumulation
    loss_value, micro_alphas, micro_lams = 0.0, [], []
    for first in range(0, t.batch_size, chunk):  # micro-batches: each a mean, averaged over the step
        batch = collate(run.samples, global_indices[first : first + chunk][dist.rank :: dist.world])
        batch = batch.to(run.placement.device)
        out = micro_batch_loss(
            run.model, run.drafter, run.capture.states(batch), batch.loss_mask, run.config.loss, run.placement
        )
        (out["loss"] / t.grad_accumulation).backward()
        loss_value += float(out["loss"].detach()) / t.grad_accumulation / dist.world
        micro_alphas.append(out["alpha"])
        micro_lams.append(out["lam"])
        del out
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.drafter.trainable_parameters(), run.config.optimizer.grad_clip
    )
    grad_norm = float(
        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    )  # FSDP2: a DTensor
    (loss_value,) = _all_reduce_sum([loss_value], dist, run.placement.device)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        previous = ckpt.latest_checkpoint(run.checkpoints_dir)
        kept = f"the last good checkpoint is {previous}" if previous else "no checkpoint was written yet"
        raise UserError(
            f"the loss is not finite at step {step + 1} (loss {loss_value}, gradient norm "
            f"{grad_norm}); training stopped, {kept}"
        )
    run.optimizer.step()
    run.scheduler.step()
    return {
        "loss": loss_value,
        "alpha": [sum(c) / len(c) for c in zip(*micro_alphas, strict=True)],
        "lam": [sum(c) / len(c) for c in zip(*micro_lams, strict=True)],
        "grad_norm": grad_norm,
        "tokens": sum(len(run.samples[i].input_ids) for i in global_indices),
    }


# ------------------------------------------------------------------------------------------ evaluate, export, save
def evaluate_run(run: Run, step: int) -> dict:
    """Held-out metrics at ``step`` on every rank (each evaluates its share), with the metrics of each of
    ``data.eval_dirs`` under ``eval_data``; a new best (by held-out expected acceptance length) is exported."""
    c, t = run.config, run.config.training
    with full_weights(run.model):
        metrics = evaluate(
            run.drafter,
            run.capture,
            run.samples,
            run.heldout_indices,
            c.loss.num_steps,
            t.eval_batch_size,
            run.dist,
        )
        eval_data = evaluate_eval_sets(
            run.drafter,
            run.capture,
            run.samples,
            run.eval_sets,
            c.loss.num_steps,
            t.eval_batch_size,
            run.dist,
        )
    if eval_data:
        metrics = {**metrics, "eval_data": eval_data}
    if metrics:
        run.logger.write({"step": step, "eval": metrics})
        held_out = metrics.get("expected_acceptance_length", -1.0)
        if held_out > run.best["expected_acceptance_length"]:  # alike on every rank
            run.best.update(step=step, expected_acceptance_length=held_out)
            export(run, BEST_EXPORT, step, metrics)
    return metrics


def export(run: Run, directory: str, step: int, metrics: dict) -> None:
    """Write ``RUN/<directory>`` (vLLM's format) from rank 0, with ``evaluate_run``'s ``metrics`` in its
    ``lk_training.json`` (``heldout``, and ``eval_data`` when there are eval directories). Every rank calls it:
    under FSDP2 the ranks first gather the whole weights (a collective)."""
    weights = None
    if isinstance(run.model, FSDPModule):
        gathered = get_model_state_dict(run.model, options=_state_dict_options(cpu_offload=True))
        weights = {name.removeprefix("drafter."): tensor for name, tensor in gathered.items()}
    if not run.dist.main:
        return
    config, t = run.config, run.config.training
    heldout = {key: value for key, value in metrics.items() if key != "eval_data"}
    record = {
        "loss": config.loss.kind,
        "eta": config.loss.eta,
        "gamma": config.loss.gamma,
        "num_steps": config.loss.num_steps,
        "steps": step,
        "batch_size": t.batch_size,
        "optimizer": config.optimizer.model_dump(mode="json"),
        "recipe": run.name,
        "data": {
            "dirs": run.data_dirs,
            "train_samples": len(run.train_indices),
            "heldout_samples": len(run.heldout_indices),
        },
        "target_fingerprint": run.fingerprint,
        "heldout": heldout,
        **({"eval_data": metrics["eval_data"]} if "eval_data" in metrics else {}),
        "config": config.model_dump(mode="json"),
    }
    run.drafter.save_pretrained(
        run.run_dir / directory,
        target=target_info(run.target),
        training=record,
        dtype=getattr(torch, t.export_dtype),
        state_dict=weights,
    )


def save_checkpoint(run: Run, step: int) -> None:
    """``RUN/checkpoints/step-N``: every rank hands in its shard (a collective), rank 0 writes whole tensors."""
    model_state, optimizer_state = get_state_dict(
        run.model, run.optimizer, options=_state_dict_options(cpu_offload=True)
    )
    if run.dist.main:
        ckpt.save_checkpoint(
            run.checkpoints_dir,
            step,
            {
                "format": ckpt.FORMAT,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": run.scheduler.state_dict(),
                "rng": ckpt.rng_state(),
                "step": step,
                "best": run.best,
                "config": run.config.model_dump(mode="json"),
                "data_key": run.data_key,
            },
            keep=run.config.training.keep_checkpoints,
        )


# ------------------------------------------------------------------------------------------ the loop
def train(config: Config, name: str = "run", resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) a training run; returns a summary. Raises UserError for anything the user can fix."""
    from tqdm import tqdm

    run = build_run(config, name, resume, progress)
    t, dist = config.training, run.dist
    bar = tqdm(
        total=t.max_steps,
        initial=run.start_step,
        desc="training",
        unit="step",
        disable=not (progress and dist.main),
    )
    tokens_seen, clock, metrics = 0, time.time(), {}
    for step in range(run.start_step, t.max_steps):
        result = train_step(run, step)
        done = step + 1
        tokens_seen += result["tokens"]
        tokens_per_s = tokens_seen / max(time.time() - clock, 1e-9)
        bar.update(1)
        bar.set_postfix(
            loss=f"{result['loss']:.4f}", alpha=f"{result['alpha'][0]:.3f}", tok_s=f"{tokens_per_s:.0f}"
        )
        if done % t.log_every == 0 or done == t.max_steps:
            run.logger.write(
                {
                    "step": done,
                    **result,
                    "lr": run.scheduler.get_last_lr()[0],
                    "tokens_per_s": round(tokens_per_s, 1),
                    "time": round(time.time(), 3),
                }
            )
        if done % t.eval_every == 0 or done == t.max_steps:
            metrics = evaluate_run(run, done)
            if metrics and dist.main:
                bar.write(f"step {done}: {describe_eval(metrics)}")
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            save_checkpoint(run, done)
    bar.close()

    if not metrics and (run.heldout_indices or run.eval_sets):  # resumed at the end: nothing evaluated here
        metrics = evaluate_run(run, t.max_steps)
    export(run, FINAL_EXPORT, t.max_steps, metrics)
    summary = {
        "run_dir": str(run.run_dir),
        "steps": t.max_steps,
        "best": run.best,
        "capture_cache": str(run.capture.directory) if t.capture == "offline" else None,
    }
    if dist.main:
        summary.update(final=metrics, tokens_per_s=round(tokens_seen / max(time.time() - clock, 1e-9), 1))
        write_atomic(run.run_dir / "summary.json", json.dumps(summary, indent=1))
        run.logger.close()
    dist.barrier()  # every rank leaves with the exports written
    return summary


def describe_eval(metrics: dict) -> str:
    """One line for the progress bar: held-out and eval-data expected acceptance length (T=1 alpha, T=0 top-1)."""

    def lengths(m: dict) -> str:
        return f"{m['expected_acceptance_length']:.4f} (T=0 {m['expected_acceptance_length_greedy']:.4f})"

    parts = (
        [f"held-out expected acceptance length {lengths(metrics)}"] if "per_position_alpha" in metrics else []
    )
    parts += [f"{e['name']} {lengths(e)}" for e in metrics.get("eval_data", []) if "per_position_alpha" in e]
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------ command line
# The train flags for common config fields (dotted field -> flag); any other field is --set SECTION.FIELD=VALUE.
TRAIN_FLAGS = {
    "loss.kind": "--loss",
    "loss.eta": "--eta",
    "data.dirs": "--data",
    "data.eval_dirs": "--eval-data",
    "model.init_from": "--init-from",
    "data.chat_template": "--chat-template",
    "output": "--output",
}


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--recipe", help=f"a built-in recipe: {', '.join(recipe_names())}")
    source.add_argument("--config", help="a YAML file with the same structure as the recipes")
    fields = ", ".join(f"{key} ({value})" for key, value in flatten(Config()).items())
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, value in YAML syntax, e.g. --set optimizer.lr=1e-3 "
        f"(repeatable). Fields (defaults): {fields}",
    )
    add_target_argument(parser, "the recipe's model.target")
    add_field_flags(parser, Config, TRAIN_FLAGS, over_recipe=True)
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint of --output"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the estimated memory per device (params, optimizer, activations, logits) and exit",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args) -> tuple[Config, str]:
    overrides = field_values(args, TRAIN_FLAGS)
    if args.target is not None:
        overrides["model.target"] = args.target
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    return load_config(args.recipe, args.config, overrides)


def run(args) -> int:
    config, name = config_from_args(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    if args.dry_run:
        from lk_vllm.assets import resolve_target
        from training.memory import estimate_memory

        t = config.training
        placement = resolve_placement(t.device, t.precision, t.tf32)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        estimate = estimate_memory(config, resolve_target(config.model.target), placement.device.type, world)
        print(
            f"{name}: {config.model.architecture} drafter, {estimate.trainable_parameters / 1e6:.1f}M trainable "
            f"parameters; {placement.describe()}, {world} rank(s), {estimate.tokens_per_micro_batch} tokens per "
            "micro-batch; estimated memory per device:"
        )
        print("\n".join(estimate.lines()))
        return 0
    summary = train(config, name, resume=args.resume, progress=not args.no_progress)
    if "final" in summary:
        from lk_vllm.validate import check_exports

        check_exports(Path(summary["run_dir"]), config.loss.num_steps)  # lk-vllm validate's static checks
        final = summary["final"]
        print(
            f"trained {summary['steps']} steps: drafter in {summary['run_dir']}/final"
            + (
                f", held-out expected acceptance length {final['expected_acceptance_length']:.4f}"
                if final
                else ""
            )
        )
        if summary["best"]["step"] is not None:
            print(
                f"best step {summary['best']['step']} (expected acceptance length "
                f"{summary['best']['expected_acceptance_length']:.4f}) in {summary['run_dir']}/{BEST_EXPORT}"
            )
    return 0
