"""Target hidden states for training, captured online or read from an offline cache; same results either way.

* **online**: the HF target runs under ``no_grad`` on every training batch (``OnlineCapture``).
* **offline**: one pass of the target over the whole data set writes the auxiliary hidden states (what an
  EAGLE-3 drafter reads), the final hidden state (after the final norm) to fp16/bf16 safetensors shards and,
  per token, the fp32 logsumexp of the target logits over the full vocabulary (``build_cache``); training then
  reads them (``OfflineCapture``). Target logits are never stored: they are recomputed at train time from the
  cached final hidden state with the target's ``lm_head`` (``TargetStates.logits_at``), which is what the
  online path does too, and with the cached normaliser a drafter with its own vocabulary needs only those
  columns (``TargetStates.draft_logits_at``). The normaliser is taken from the cached (rounded) hidden state,
  so it matches the logits recomputed from it. The cache is keyed by the target's
  fingerprint, the data manifests, the aux layer ids, the sequence length and the dtype, so it cannot be
  reused for anything it does not match.

  Under torchrun every rank calls ``build_cache`` on one shared directory and builds shard ``i`` when
  ``i % world`` is its rank. Before any forward pass each rank budgets the whole cache alike (tokens still to
  write x ``cache_bytes_per_token``) against the free space of the directory's disk and refuses when it does
  not fit; rank 0 prints the budget. A shard counts only once ``validate_shard`` passes it (format, tensor names,
  shapes, dtypes, offsets, finite values): one already on disk that fails is captured again, and each freshly
  written one is checked too. When every rank is done, rank 0 checks that every shard is there (headers) and
  only then writes ``manifest.json``, which marks the cache complete; ``OfflineCapture`` refuses a cache whose
  shards do not match its manifest.

Both captures return ``lk_vllm.target_model.TargetStates`` for a ``Batch`` (right-padded; causal attention makes
the states of real tokens independent of the padding).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lk_vllm.atomic import atomic_path, write_atomic
from lk_vllm.errors import UserError
from lk_vllm.log import log
from lk_vllm.target_model import TargetStates, position_ids_from_mask

# v2: + "lse", the full-vocabulary logsumexp per token; v3: "lse" from fp32 products (a bf16 target's v2 caches
# hold a bf16-rounded normaliser that the loss can find below the draft ids' own).
CACHE_FORMAT = "lk-vllm-hidden-cache-v3"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Batch:
    indices: list[int]  # sample indices (into the run's sample list)
    input_ids: torch.Tensor  # [B, T] long, right-padded with 0
    attention_mask: torch.Tensor  # [B, T] bool
    loss_mask: torch.Tensor  # [B, T] bool, True on generated tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> Batch:
        return Batch(
            self.indices, self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device)
        )


def collate(samples, indices: list[int]) -> Batch:
    """Right-pad ``samples[i] for i in indices`` to the longest one."""
    chosen = [samples[i] for i in indices]
    length = max(len(s.input_ids) for s in chosen)
    input_ids = torch.zeros(len(chosen), length, dtype=torch.long)
    attention = torch.zeros(len(chosen), length, dtype=torch.bool)
    loss_mask = torch.zeros(len(chosen), length, dtype=torch.bool)
    for row, sample in enumerate(chosen):
        n = len(sample.input_ids)
        input_ids[row, :n] = sample.input_ids
        attention[row, :n] = True
        loss_mask[row, :n] = sample.loss_mask
    return Batch(list(indices), input_ids, attention, loss_mask)


class OnlineCapture:
    """Runs the target on each batch."""

    def __init__(self, target, aux_layer_ids):
        self.target = target
        self.aux_layer_ids = tuple(aux_layer_ids) if aux_layer_ids else None

    @property
    def device(self) -> torch.device:
        return self.target.device

    def states(self, batch: Batch) -> TargetStates:
        """The target's states for ``batch`` (already on ``device``)."""
        return self.target(batch.input_ids, batch.attention_mask, aux_layer_ids=self.aux_layer_ids)

    def idle(self) -> None:
        """Keep step with the other ranks' ``states`` calls when this one has no batch (a sharded target)."""
        self.target.idle()


def cache_key(
    target_fingerprint: str, data_dirs: list[str], aux_layer_ids, max_length: int, dtype: str
) -> str:
    manifests = []
    for directory in data_dirs:
        manifests.append(hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest())
    blob = json.dumps(
        {
            "target": target_fingerprint,
            "data": manifests,
            "aux": list(aux_layer_ids or []),
            "max_length": max_length,
            "dtype": dtype,
            "format": CACHE_FORMAT,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("shard-*.safetensors"))


def cache_bytes_per_token(hidden_size: int, num_aux: int, dtype: str) -> int:
    """Bytes one token takes in the cache: the final and ``num_aux`` auxiliary hidden states in ``dtype`` and the
    fp32 normaliser (the offsets, one int64 per sample, are left out)."""
    return hidden_size * (1 + num_aux) * DTYPES[dtype].itemsize + 4


def shard_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}.safetensors"


def _shards_present(directory: Path) -> dict[int, Path]:
    """The shard files in ``directory`` by index."""
    present = {}
    for path in Path(directory).glob("shard-*.safetensors"):
        match = re.fullmatch(r"shard-(\d+)\.safetensors", path.name)
        if match:
            present[int(match.group(1))] = path
    return present


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def validate_shard(
    path: Path, sample_lengths, hidden_size: int, num_aux: int, dtype: str, values: bool = True
) -> str | None:
    """None when ``path`` is a cache shard of samples of ``sample_lengths`` tokens, else a one-line reason: the file
    opens, has the cache format, the tensors ``final`` [tokens, H] and ``aux`` [tokens, H * num_aux] (when
    ``num_aux``) in ``dtype``, ``lse`` [tokens] fp32 and ``offsets`` [n + 1] int64 equal to the cumulative
    lengths; with ``values``, every hidden state and normaliser is finite (read in bounded chunks)."""
    from safetensors import SafetensorError, safe_open

    lengths = [int(n) for n in sample_lengths]
    tokens = sum(lengths)
    expected = {
        "final": ([tokens, hidden_size], DTYPES[dtype]),
        "lse": ([tokens], torch.float32),
        "offsets": ([len(lengths) + 1], torch.int64),
    }
    if num_aux:
        expected["aux"] = ([tokens, hidden_size * num_aux], DTYPES[dtype])
    if not Path(path).is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            found_format = (handle.metadata() or {}).get("format")
            if found_format != CACHE_FORMAT:
                return f"format {found_format!r}, expected {CACHE_FORMAT!r}"
            names = sorted(handle.keys())
            if names != sorted(expected):
                return f"holds tensors {names}, expected {sorted(expected)}"
            for name, (shape, torch_dtype) in expected.items():
                piece = handle.get_slice(name)
                if list(piece.get_shape()) != shape:
                    return f"{name} has shape {list(piece.get_shape())}, expected {shape}"
                if piece.get_dtype() != _SAFETENSORS_DTYPES[torch_dtype]:
                    return f"{name} is {piece.get_dtype()}, expected {_SAFETENSORS_DTYPES[torch_dtype]}"
            offsets = handle.get_tensor("offsets").tolist()
            if offsets != [0, *itertools.accumulate(lengths)]:
                return "offsets do not match the samples' lengths"
            if values:
                for name, (shape, _) in expected.items():
                    if name == "offsets":
                        continue
                    piece = handle.get_slice(name)
                    width = shape[1] if len(shape) > 1 else 1
                    step = max(1, (1 << 25) // width)  # about 32M values at a time
                    for start in range(0, tokens, step):
                        if not bool(torch.isfinite(piece[start : start + step]).all()):
                            return f"{name} holds non-finite values (rows {start}..{min(start + step, tokens) - 1})"
    except (OSError, SafetensorError) as exc:
        return f"cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_cache(
    target,
    samples,
    aux_layer_ids,
    directory: Path,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
) -> dict:
    """Run the target over every sample once and write the hidden-state shards; resumes a partial cache and
    re-makes any shard that fails ``validate_shard``. Every rank calls it (``barrier`` syncs them, e.g.
    ``torch.distributed.barrier``; the directory must be shared by all ranks); shard ``i`` is built by rank
    ``i % world``. Refuses (``UserError``) before any forward pass when the disk cannot hold what remains to be
    written. Returns the cache manifest (with its size on disk), the same on every rank."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    wait = barrier or (lambda: None)
    aux_layer_ids = tuple(aux_layer_ids) if aux_layer_ids else None
    num_aux = len(aux_layer_ids or ())
    shards = [
        list(range(first, min(first + shard_size, len(samples))))
        for first in range(0, len(samples), shard_size)
    ]
    lengths = [[len(samples[i].input_ids) for i in members] for members in shards]

    def check(shard: int, values: bool) -> str | None:
        return validate_shard(
            shard_path(directory, shard), lengths[shard], target.hidden_size, num_aux, dtype, values=values
        )

    # Nothing is written before the first barrier, so every rank sees the same files here and takes the same
    # branch (return, refuse or build). Headers only: reading every value of a large cache at each start is
    # too slow; the owner of a shard reads its values before using it below.
    header_ok = [check(shard, values=False) is None for shard in range(len(shards))]
    extra = [path for index, path in _shards_present(directory).items() if index >= len(shards)]
    manifest = _read_manifest(manifest_path)
    if manifest and manifest.get("num_samples") == len(samples) and all(header_ok) and not extra:
        return manifest

    per_token = cache_bytes_per_token(target.hidden_size, num_aux, dtype)
    to_capture = sum(sum(lengths[shard]) for shard in range(len(shards)) if not header_ok[shard])
    there = sum(
        shard_path(directory, shard).stat().st_size for shard in range(len(shards)) if header_ok[shard]
    )
    free = shutil.disk_usage(_nearest_existing(directory)).free
    # Every rank budgets the whole cache (one shared directory) and so refuses alike; rank 0 prints it.
    if rank == 0:
        log(
            f"hidden-state cache {directory}: {to_capture} tokens x {per_token} bytes/token = "
            f"{_gb(to_capture * per_token)} to write ({_gb(there)} already there), {_gb(free)} free"
        )
    if to_capture * per_token > free:
        raise UserError(
            f"hidden-state cache {directory}: {_gb(to_capture * per_token)} to write, {_gb(free)} free "
            f"on its disk; free space, set LK_VLLM_HOME to a larger disk, use a smaller "
            f"training.cache_dtype (now {dtype}) or --set training.capture=online"
        )
    directory.mkdir(parents=True, exist_ok=True)
    wait()
    if rank == 0:  # a manifest means "complete": none until this run's shards are all in place
        manifest_path.unlink(missing_ok=True)

    from tqdm import tqdm

    mine = [shard for shard in range(len(shards)) if shard % world == rank]
    bar = tqdm(
        total=sum(sum(lengths[shard]) for shard in mine),
        unit="tok",
        desc="capturing hidden states",
        disable=not (progress and rank == 0),
    )
    started, captured = time.time(), 0
    todo = []
    for shard in mine:
        path = shard_path(directory, shard)
        if path.is_file():
            reason = check(shard, values=True)
            if reason is None:
                bar.update(sum(lengths[shard]))
                continue
            log(f"hidden-state cache {path}: {reason}; capturing it again")
        todo.append(shard)
    forwards = sum(-(-len(shards[shard]) // batch_size) for shard in todo)
    # A target sharded over the ranks runs only when every rank runs it: the ranks with fewer batches idle.
    idle = _most_over_ranks(forwards) - forwards if getattr(target, "sharded", False) else 0
    # fp32 for logsumexp_of_logits, converted once per capture (not per shard or sample)
    lm_head = target.lm_head_weight.float() if todo else None
    for shard in todo:
        path = shard_path(directory, shard)
        members = shards[shard]
        for tokens in _write_shard(target, lm_head, samples, members, aux_layer_ids, path, dtype, batch_size):
            captured += tokens
            bar.update(tokens)
            bar.set_postfix(tok_s=f"{captured / max(time.time() - started, 1e-9):.0f}")
        reason = check(shard, values=True)
        if reason is not None:
            overflow = "non-finite" in reason and dtype == "float16"
            hint = (
                "; float16 overflows where the target's bfloat16 does not: training.cache_dtype=bfloat16"
                if overflow
                else ""
            )
            raise UserError(
                f"hidden-state cache {path}: the shard just written fails its check: {reason}{hint}"
            )
    for _ in range(idle):
        target.idle()
    bar.close()
    wait()

    problem = None
    if rank == 0:
        for path in extra:  # left by a run with another shard size
            path.unlink(missing_ok=True)
        for shard in range(len(shards)):
            # Headers only: each shard's values were checked by the rank that wrote or kept it.
            reason = check(shard, values=False)
            if reason is not None:
                problem = f"{shard_path(directory, shard).name} {reason}"
                break
        if problem is None:
            elapsed = time.time() - started
            manifest = {
                "format": CACHE_FORMAT,
                "num_samples": len(samples),
                "shard_size": shard_size,
                "num_shards": len(shards),
                "dtype": dtype,
                "aux_layer_ids": list(aux_layer_ids or []),
                "tokens": sum(map(sum, lengths)),
                "bytes": cache_size_bytes(directory),
                "bytes_per_token": per_token,
                # tokens of the shards missing at the start over the time until every rank was done
                "capture_tokens_per_s": round(to_capture / elapsed, 1) if to_capture else None,
            }
            write_atomic(manifest_path, json.dumps(manifest, indent=1))
    wait()
    if problem is not None:
        raise UserError(
            f"hidden-state cache {directory}: {problem} after every rank wrote its shards; all "
            f"{world} rank(s) must write to the same directory (a file system they share)"
        )
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        raise UserError(
            f"hidden-state cache {directory}: rank 0 found the cache incomplete (its error says why)"
        )
    return manifest


def _most_over_ranks(value: int) -> int:
    """The largest ``value`` over the process group's ranks (a collective)."""
    if not dist.is_initialized():
        return value
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    tensor = torch.tensor([value], dtype=torch.int64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _write_shard(
    target, lm_head, samples, members: list[int], aux_layer_ids, path: Path, dtype: str, batch_size: int
):
    """Capture the samples ``members`` into the shard ``path`` (atomically); yields the tokens of each batch.
    ``lm_head`` is the target's output projection in fp32."""
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    final_rows: dict[int, torch.Tensor] = {}
    lse_rows: dict[int, torch.Tensor] = {}
    aux_rows: dict[int, torch.Tensor] = {}
    by_length = sorted(members, key=lambda i: len(samples[i].input_ids))  # less padding
    for start in range(0, len(by_length), batch_size):
        batch = collate(samples, by_length[start : start + batch_size]).to(target.device)
        states = target(batch.input_ids, batch.attention_mask, aux_layer_ids=aux_layer_ids)
        for row, index in enumerate(batch.indices):
            n = len(samples[index].input_ids)
            final = states.final_hidden[row, :n].to(torch_dtype)
            final_rows[index] = final.cpu()
            lse_rows[index] = logsumexp_of_logits(final, lm_head).cpu()
            if states.aux_hidden is not None:
                aux_rows[index] = states.aux_hidden[row, :n].to("cpu", torch_dtype)
        yield batch.num_tokens
    lengths = [len(samples[i].input_ids) for i in members]
    tensors = {
        "final": torch.cat([final_rows[i] for i in members]),
        "lse": torch.cat([lse_rows[i] for i in members]),
        "offsets": torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0),
    }
    if aux_rows:
        tensors["aux"] = torch.cat([aux_rows[i] for i in members])
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "first": str(members[0])})


def logsumexp_of_logits(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """fp32 logsumexp over the vocabulary of ``hidden @ lm_head_weight.T``, chunk by chunk (never [T, V] at
    once), with fp32 products as ``TargetStates.draft_logits_at`` computes the draft ids' logits (a bf16 target's
    weights and states are exact in fp32, so the two agree to fp32 rounding)."""
    weight = lm_head_weight.float()
    return torch.cat([torch.logsumexp(h.float() @ weight.T, dim=1) for h in hidden.split(chunk_size)])


class OfflineCapture:
    """Reads cached hidden states; the target contributes only its (frozen) lm_head and embeddings."""

    def __init__(self, target, directory: Path, aux_layer_ids):
        from safetensors import safe_open

        self.target = target
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / "manifest.json").read_text())
        self.aux_layer_ids = tuple(aux_layer_ids) if aux_layer_ids else ()
        if list(self.aux_layer_ids) != self.manifest["aux_layer_ids"]:
            raise ValueError(
                f"cache {directory} holds aux layers {self.manifest['aux_layer_ids']}, "
                f"the drafter needs {list(self.aux_layer_ids)}"
            )
        self.shard_size = int(self.manifest["shard_size"])
        num_shards = int(
            self.manifest.get("num_shards", -(-int(self.manifest["num_samples"]) // self.shard_size))
        )
        present = _shards_present(self.directory)
        if sorted(present) != list(range(num_shards)):
            missing = [shard for shard in range(num_shards) if shard not in present]
            which = (
                f"{shard_path(self.directory, missing[0]).name} is missing"
                if missing
                else f"{present[max(present)].name} is not in it"
            )
            raise UserError(
                f"hidden-state cache {self.directory}: manifest.json lists {num_shards} shards, "
                f"{len(present)} are present ({which}); delete the directory to capture it again"
            )
        self._files = {}
        self._offsets = {}
        for shard, path in sorted(present.items()):
            handle = safe_open(str(path), framework="pt")
            self._files[shard] = handle
            self._offsets[shard] = handle.get_tensor("offsets").tolist()

    @property
    def device(self) -> torch.device:
        return self.target.device

    def idle(self) -> None:
        """Nothing to keep step with: reading the cache involves no other rank."""

    def _rows(self, index: int, name: str) -> torch.Tensor:
        shard, local = divmod(index, self.shard_size)
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        return self._files[shard].get_slice(name)[start:end]

    def states(self, batch: Batch) -> TargetStates:
        """The cached states of ``batch`` (already on ``device``), in the target's dtype, on its device
        (assembled on the host, one copy)."""
        b, t = batch.input_ids.shape
        hidden = self.target.hidden_size
        dtype = self.target.lm_head_weight.dtype
        final = torch.zeros(b, t, hidden, dtype=dtype)
        lse = torch.zeros(b, t)
        aux = torch.zeros(b, t, hidden * len(self.aux_layer_ids), dtype=dtype) if self.aux_layer_ids else None
        for row, index in enumerate(batch.indices):
            rows = self._rows(index, "final")
            final[row, : rows.shape[0]] = rows
            lse[row, : rows.shape[0]] = self._rows(index, "lse")
            if aux is not None:
                aux_rows = self._rows(index, "aux")
                aux[row, : aux_rows.shape[0]] = aux_rows
        final = final.to(self.device, non_blocking=True)
        lse = lse.to(self.device, non_blocking=True)
        aux = None if aux is None else aux.to(self.device, non_blocking=True)
        return TargetStates(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
            final_hidden=final,
            aux_hidden=aux,
            aux_layer_ids=self.aux_layer_ids,
            lm_head_weight=self.target.lm_head_weight,
            embed_weight=self.target.embed_weight,
            final_logsumexp=lse,
        )
