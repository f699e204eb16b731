"""Sequence-level heads on the backbone's per-position representation.

The representation is the post-LayerNorm fused feature (spec §2.9, ``mode="representation"``), [B, L, d]. Pooling
is the mean over real positions only (upstream averages over the pads too: spec §4.4, defect 16), then a linear
layer: class logits (multiclass), independent label logits (multilabel) or values (regression).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions where ``mask`` is true ([B, L, d] -> [B, d]); all positions when ``mask`` is None."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class SequenceModel(nn.Module):
    """Backbone + masked mean pooling + linear head. ``freeze_backbone`` trains the head only (a linear probe)."""

    def __init__(self, backbone: nn.Module, d_model: int, num_outputs: int, kind: str,
                 dropout: float = 0.0, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_outputs)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "SequenceModel":
        super().train(mode)
        if self.freeze_backbone:  # a frozen backbone is a fixed feature extractor: no dropout in it
            self.backbone.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            hidden = self.backbone(input_ids, mode="representation")
        pooled = masked_mean(hidden.float(), attention_mask)
        return self.head(self.dropout(pooled))

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over samples of each sample's loss (over its labels/outputs); ``weight`` [B] (0 for padding rows)
        makes it a weighted mean, without a host sync."""
        if self.kind == "multiclass":
            per_sample = F.cross_entropy(outputs, labels, reduction="none")
        elif self.kind == "multilabel":
            per_sample = F.binary_cross_entropy_with_logits(outputs, labels, reduction="none").mean(-1)
        else:
            per_sample = F.mse_loss(outputs, labels, reduction="none").mean(-1)
        if weight is None:
            return per_sample.mean()
        return (per_sample * weight).sum() / weight.sum()
