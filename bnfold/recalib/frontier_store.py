"""Where population mode keeps each batch's frontier between passes: memory, then a spill file.

A checkpoint is one batch's values at a pass boundary (``{name: value}``, the tensors later
passes read; the raw input counts as the checkpoint before pass 1). The store keeps at most one
checkpoint per batch and holds them

1. in memory, up to ``memory_bytes`` (the budget it shares with the data cache:
   ``data_cache_mb``; tensors sharing a storage are counted once);
2. beyond that, in memory-mapped temporary files, up to ``spill_bytes`` (by default what the
   temporary directory has free, less a 1 GiB margin, checked at each write). Each file is
   unlinked as soon as it is mapped, so the space returns to the file system when the mapping
   is dropped, whatever way the process ends (an exception, Ctrl-C, even SIGKILL);
3. when neither has room, the new checkpoint is refused and the batch keeps its older one: the
   next pass recomputes from that, the nearest stored frontier.

Tensors come back with their shape, strides, dtype and device, so the layers after them see
exactly what they would have seen in one forward (memory layout can change which kernel runs,
hence the bits). Only dense, non-overlapping CPU-representable tensors are spilled; anything
else (a Python number, an expanded view) must fit in memory.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch

__all__ = ["FrontierStore", "StoreStats"]

_DISK_MARGIN = 1 << 30


@dataclass(frozen=True)
class _Spilled:
    """A tensor written to an unlinked, memory-mapped file."""

    buffer: mmap.mmap
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int

    def load(self) -> torch.Tensor:
        raw = torch.frombuffer(self.buffer, dtype=torch.uint8, count=self.nbytes)
        dense = raw.view(self.dtype).view([self.shape[p] for p in self.perm])
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return dense.permute(inverse).to(self.device)


@dataclass
class _Checkpoint:
    segment: int
    values: dict[str, Any]
    memory: int
    disk: int


@dataclass
class StoreStats:
    """What the store held: peaks in bytes, and how often a checkpoint was refused."""

    peak_memory: int = 0
    peak_disk: int = 0
    refused: int = 0
    spilled: int = 0


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _memory_bytes(values: dict[str, Any]) -> int:
    """Bytes held by the tensors of ``values``, each storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    for v in values.values():
        for t in _tensors(v):
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _dense_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation making ``t`` contiguous, or None when its memory is not dense."""
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride()[d], -t.shape[d])))
    if t.permute(perm).is_contiguous():
        return perm
    return None


class FrontierStore:
    """At most one checkpoint per batch, in memory within a budget, then spilled to disk."""

    def __init__(self, memory_bytes: int, spill_bytes: int | None = None) -> None:
        self._memory_budget = memory_bytes
        self._spill_budget = spill_bytes
        self._tmpdir = tempfile.gettempdir()
        self._entries: dict[int, _Checkpoint] = {}
        self._memory = 0
        self._disk = 0
        self.stats = StoreStats()

    def __enter__(self) -> FrontierStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop every checkpoint (the spill mappings with them)."""
        for entry in self._entries.values():
            self._release(entry)
        self._entries.clear()
        self._memory = self._disk = 0

    def get(self, key: int) -> tuple[int, dict[str, Any]] | None:
        """``(segment, values)`` of batch ``key``'s checkpoint (spilled tensors read back)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        values = {k: v.load() if isinstance(v, _Spilled) else v for k, v in entry.values.items()}
        return entry.segment, values

    def put(self, key: int, segment: int, values: dict[str, Any]) -> bool:
        """Replace batch ``key``'s checkpoint by ``values``; False (old one kept) if no room."""
        old = self._entries.get(key)
        memory_free = self._memory_budget - self._memory + (old.memory if old else 0)
        kept: dict[str, Any] = {}
        to_spill: list[tuple[str, torch.Tensor, tuple[int, ...]]] = []
        need = _memory_bytes(values)
        if need > memory_free:
            # spill the largest dense tensors until the rest fits in memory
            candidates = []
            for name, v in values.items():
                if isinstance(v, torch.Tensor):
                    perm = _dense_order(v)
                    if perm is not None:
                        candidates.append((v.untyped_storage().nbytes(), name, v, perm))
            candidates.sort(key=lambda c: -c[0])
            rest = dict(values)
            for _size, name, v, perm in candidates:
                if _memory_bytes(rest) <= memory_free:
                    break
                to_spill.append((name, v, perm))
                del rest[name]
            if _memory_bytes(rest) > memory_free:
                self.stats.refused += 1
                return False
            spill_bytes = sum(v.numel() * v.element_size() for _n, v, _p in to_spill)
            # the free disk space is asked only when something must spill (a statvfs per
            # checkpoint would cost more than the bookkeeping it guards)
            if spill_bytes > self._disk_room() + (old.disk if old else 0):
                self.stats.refused += 1
                return False
        spilled: dict[str, _Spilled] = {}
        try:
            for name, v, perm in to_spill:
                spilled[name] = self._spill(v, perm)
        except OSError:
            # the disk filled up under us: refuse, as when the budget is spent
            self.stats.refused += 1
            return False
        kept = {k: spilled.get(k, v) for k, v in values.items()}
        memory = (
            _memory_bytes({k: v for k, v in kept.items() if not isinstance(v, _Spilled)})
            if spilled
            else need
        )
        disk = sum(s.nbytes for s in spilled.values())
        if old is not None:
            self._release(old)
        self._entries[key] = _Checkpoint(segment, kept, memory, disk)
        self._memory += memory
        self._disk += disk
        self.stats.spilled += len(spilled)
        self.stats.peak_memory = max(self.stats.peak_memory, self._memory)
        self.stats.peak_disk = max(self.stats.peak_disk, self._disk)
        return True

    def _release(self, entry: _Checkpoint) -> None:
        self._memory -= entry.memory
        self._disk -= entry.disk
        entry.values.clear()

    def _disk_room(self) -> int:
        if self._spill_budget is not None:
            return self._spill_budget - self._disk
        try:
            free = shutil.disk_usage(self._tmpdir).free
        except OSError:
            return 0
        return max(free - _DISK_MARGIN, 0)

    def _spill(self, t: torch.Tensor, perm: tuple[int, ...]) -> _Spilled:
        dense = t.detach().permute(perm).contiguous().cpu()
        nbytes = dense.numel() * dense.element_size()
        fd, path = tempfile.mkstemp(prefix="bnfold-frontier-", dir=self._tmpdir)
        try:
            os.unlink(path)
            os.ftruncate(fd, max(nbytes, 1))
            buffer = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        if nbytes:
            target = np.frombuffer(buffer, dtype=np.uint8, count=nbytes)
            target[:] = dense.reshape(-1).view(torch.uint8).numpy()
        return _Spilled(buffer, tuple(t.shape), perm, t.dtype, t.device, nbytes)
