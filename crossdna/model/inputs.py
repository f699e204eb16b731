"""Checks on the model's input ids and the reverse complement in id space (spec §1)."""
from __future__ import annotations

import torch

from crossdna.tokens import COMPLEMENT


def check_input_ids(ids: torch.Tensor, alphabet_size: int, where: str = "input_ids") -> None:
    """Dtype, rank and length: free (no device work), so the model does it on every forward."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.LongTensor [batch, length], got {type(ids).__name__}")
    if ids.dtype != torch.long:
        raise ValueError(f"{where}: expected dtype torch.int64 (token ids), got {ids.dtype}; convert with .long()")
    if ids.dim() != 2:
        raise ValueError(f"{where}: expected shape [batch, length], got {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{where}: empty batch or sequence, shape {tuple(ids.shape)}")


def validate_input_ids(ids: torch.Tensor, alphabet_size: int, where: str = "input_ids") -> None:
    """Full check including the id range. The range check reads the tensor (a host sync on GPU), so it belongs
    at a boundary (data loader, CLI, export), once per batch; the model only does it itself for CPU tensors."""
    check_input_ids(ids, alphabet_size, where)
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= alphabet_size:
        names = "A,C,G,T,N" + (",MASK" if alphabet_size == 6 else "")
        raise ValueError(f"{where}: ids must be in 0..{alphabet_size - 1} ({names}), found values in [{lo}, {hi}]")


def complement_table(alphabet_size: int) -> torch.Tensor:
    """id → complement id (A↔T, C↔G, N and [MASK] fixed)."""
    return torch.as_tensor(COMPLEMENT[:alphabet_size], dtype=torch.long)


def reverse_complement(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[ids].flip(1)
