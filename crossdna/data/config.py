"""Settings of the streaming loader (``data:`` section of a training config)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from crossdna.tokens import DEDICATED_MASK_ID, N


@dataclasses.dataclass
class DataConfig:
    # Manifest file (or the shard directory holding ``manifest.json``) written by ``crossdna shard``.
    path: str = ""
    train_split: str = "train"
    eval_split: str = "valid"
    # Seed of the training order, RC augmentation and training masks. Part of the resumable state.
    seed: int = 0
    # Shards are permuted per epoch, then grouped into blocks of this many shards whose samples are permuted
    # together. 1 = shard-order + within-shard shuffle; larger mixes more shards per batch at the cost of
    # ``2 * shuffle_block_shards`` shards held in memory per worker. Changing it changes the order, so it is
    # checked on resume.
    shuffle_block_shards: int = 4
    # What happens when an epoch has fewer samples left than one global batch: ``drop`` skips them (every step
    # sees one epoch only), ``wrap`` fills the batch from the start of the next epoch's order (nothing skipped).
    tail: Literal["drop", "wrap"] = "drop"

    # MLM masking (BERT 80/10/10 by default; upstream values, spec §3.1).
    mask_prob: float = 0.15
    mask_replace: float = 0.8    # selected positions shown as the mask token
    random_replace: float = 0.1  # selected positions shown as a uniformly random base A/C/G/T
    keep: float = 0.1            # selected positions shown unchanged (still scored)
    # ``upstream``: [MASK] is id 4, the same id as N (spec §1.3; needed to load upstream weights).
    # ``dedicated``: [MASK] is id 5, a sixth input channel the model must be built with.
    mask_token: Literal["upstream", "dedicated"] = "upstream"
    # Never select genomic N for masking: predicting N from context teaches nothing (spec defect 3).
    exclude_n_from_masking: bool = True
    # Replace a sample by its reverse complement, chosen per (seed, epoch, sample) deterministically.
    rc_augment: bool = False
    # Validation/test masks depend only on (eval_mask_seed, sample index): identical at every evaluation.
    eval_mask_seed: int = 20260101

    # Input pipeline.
    num_workers: int = 4
    prefetch_factor: int = 4
    pin_memory: bool = True          # only takes effect when CUDA is available
    persistent_workers: bool = True  # keeps eval workers (and their shard caches) alive between evaluations
    # sha256 of every shard is checked the first time a process opens it (streamed over the bytes read anyway).
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.shuffle_block_shards < 1:
            raise ValueError(f"shuffle_block_shards: must be >= 1, got {self.shuffle_block_shards}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob: must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_replace", "random_replace", "keep"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        total = self.mask_replace + self.random_replace + self.keep
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mask_replace + random_replace + keep: must sum to 1, got {total}")
        if self.eval_mask_seed < 0:
            raise ValueError(f"eval_mask_seed: must be >= 0, got {self.eval_mask_seed}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor: must be >= 1, got {self.prefetch_factor}")

    @property
    def mask_token_id(self) -> int:
        return N if self.mask_token == "upstream" else DEDICATED_MASK_ID
