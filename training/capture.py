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

Both captures return ``training.target.TargetStates`` for a ``Batch`` (right-padded; causal attention makes
the states of real tokens independent of the padding).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lk_vllm.atomic import atomic_path, write_atomic
from training.target import TargetStates, position_ids_from_mask

CACHE_FORMAT = "lk-vllm-hidden-cache-v2"  # v2: + "lse", the full-vocabulary logsumexp per token
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
        return Batch(self.indices, self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


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


def cache_key(target_fingerprint: str, data_dirs: list[str], aux_layer_ids, max_length: int, dtype: str) -> str:
    manifests = []
    for directory in data_dirs:
        manifests.append(hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest())
    blob = json.dumps({"target": target_fingerprint, "data": manifests, "aux": list(aux_layer_ids or []),
                       "max_length": max_length, "dtype": dtype, "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_size_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("shard-*.safetensors"))


def build_cache(target, samples, aux_layer_ids, directory: Path, dtype: str = "bfloat16", batch_size: int = 8,
                shard_size: int = 256, progress: bool = True) -> dict:
    """Run the target over every sample once and write the hidden-state shards; resumes a partial cache.
    Returns the cache manifest (with its size on disk)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("num_samples") == len(samples):
            return manifest
    directory.mkdir(parents=True, exist_ok=True)
    aux_layer_ids = tuple(aux_layer_ids) if aux_layer_ids else None
    torch_dtype = DTYPES[dtype]
    total_tokens = sum(len(s.input_ids) for s in samples)
    bar = tqdm(total=total_tokens, unit="tok", desc="capturing hidden states", disable=not progress)
    started, captured = time.time(), 0
    for first in range(0, len(samples), shard_size):
        path = directory / f"shard-{first // shard_size:05d}.safetensors"
        members = list(range(first, min(first + shard_size, len(samples))))
        if path.is_file():
            bar.update(sum(len(samples[i].input_ids) for i in members))
            continue
        final_rows: dict[int, torch.Tensor] = {}
        lse_rows: dict[int, torch.Tensor] = {}
        aux_rows: dict[int, torch.Tensor] = {}
        by_length = sorted(members, key=lambda i: len(samples[i].input_ids))  # less padding
        for start in range(0, len(by_length), batch_size):
            batch = collate(samples, by_length[start:start + batch_size]).to(target.device)
            states = target(batch.input_ids, batch.attention_mask, aux_layer_ids=aux_layer_ids)
            for row, index in enumerate(batch.indices):
                n = len(samples[index].input_ids)
                final = states.final_hidden[row, :n].to(torch_dtype)
                final_rows[index] = final.cpu()
                lse_rows[index] = logsumexp_of_logits(final, target.lm_head_weight).cpu()
                if states.aux_hidden is not None:
                    aux_rows[index] = states.aux_hidden[row, :n].to("cpu", torch_dtype)
            tokens = batch.num_tokens
            captured += tokens
            bar.update(tokens)
            bar.set_postfix(tok_s=f"{captured / max(time.time() - started, 1e-9):.0f}")
        lengths = [len(samples[i].input_ids) for i in members]
        tensors = {"final": torch.cat([final_rows[i] for i in members]),
                   "lse": torch.cat([lse_rows[i] for i in members]),
                   "offsets": torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)}
        if aux_rows:
            tensors["aux"] = torch.cat([aux_rows[i] for i in members])
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT, "first": str(first)})
    bar.close()
    elapsed = time.time() - started
    manifest = {"format": CACHE_FORMAT, "num_samples": len(samples), "shard_size": shard_size, "dtype": dtype,
                "aux_layer_ids": list(aux_layer_ids or []), "tokens": total_tokens,
                "bytes": cache_size_bytes(directory),
                "capture_tokens_per_s": round(captured / elapsed, 1) if captured else None}
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def logsumexp_of_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """fp32 logsumexp over the vocabulary of ``hidden @ lm_head_weight.T``, chunk by chunk (never [T, V] at
    once), computed as ``TargetStates.logits_at`` computes the logits."""
    hidden = hidden.to(lm_head_weight.dtype)
    return torch.cat([torch.logsumexp((h @ lm_head_weight.T).float(), dim=1) for h in hidden.split(chunk_size)])


class OfflineCapture:
    """Reads cached hidden states; the target contributes only its (frozen) lm_head and embeddings."""

    def __init__(self, target, directory: Path, aux_layer_ids):
        from safetensors import safe_open

        self.target = target
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / "manifest.json").read_text())
        self.aux_layer_ids = tuple(aux_layer_ids) if aux_layer_ids else ()
        if list(self.aux_layer_ids) != self.manifest["aux_layer_ids"]:
            raise ValueError(f"cache {directory} holds aux layers {self.manifest['aux_layer_ids']}, "
                             f"the drafter needs {list(self.aux_layer_ids)}")
        self.shard_size = int(self.manifest["shard_size"])
        self._files = {}
        self._offsets = {}
        for path in sorted(self.directory.glob("shard-*.safetensors")):
            handle = safe_open(str(path), framework="pt")
            shard = int(path.stem.split("-")[1])
            self._files[shard] = handle
            self._offsets[shard] = handle.get_tensor("offsets").tolist()

    @property
    def device(self) -> torch.device:
        return self.target.device

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
