"""HuggingFace wrappers around the CrossDNA backbone (copied into the export directory with the backbone source).

* ``CrossDNAForMaskedLM`` (``AutoModelForMaskedLM``): ``logits`` [B, L, 5] over A, C, G, T, N; ``labels`` give a
  cross-entropy loss over positions whose label is not -100.
* ``CrossDNAModel`` (``AutoModel``): ``last_hidden_state`` [B, L, d], the backbone's fused representation
  (post-LayerNorm, pre-MLM-head; upstream ``for_representation``), and ``pooler_output`` [B, d].

Both expose the representation API: ``embed(input_ids, attention_mask=None)`` → [B, L, d] and
``embed_pooled(input_ids, attention_mask=None)`` → [B, d], the mean over positions where ``attention_mask`` is 1
(all positions without a mask). The backbone reads both strands internally; there is no attention mask inside
it (upstream has none either), so pads (N) are part of the context, and only pooling skips them.

Kernels: ``backbone.kernels='auto'`` runs the PyTorch reference kernels on CPU and the fused GPU kernels on CUDA
when they are installed. Nothing here patches ``torch.compile`` or prints at import (upstream did both: spec §6
defect 17), and the forward never advances the gate step or the EMA teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput

from crossdna.config import from_dict
from crossdna.hf.configuration_crossdna import CrossDNAHFConfig
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class CrossDNAPreTrainedModel(PreTrainedModel):
    config_class = CrossDNAHFConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"

    def __init__(self, config: CrossDNAHFConfig):
        super().__init__(config)
        self.backbone = SSScanDNAHybridModel(from_dict(CrossDNAConfig, config.backbone, "config.json:backbone"))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        # transformers builds the model on the meta device, loads the file, then calls this. Parameters come from
        # the file (re-initialising would overwrite those the backbone initialises by copy_, e.g. Comba's A_log:
        # transformers only guards its own init functions), but the derived buffers (complement tables, the host
        # copy of g_step) are not in the file and are filled here, as the backbone's load hook would.
        if isinstance(module, SSScanDNAHybridModel) and not module.g_step.is_meta:
            module.sync_buffers_after_load()

    def embed(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position representation [B, L, d] (``attention_mask`` is accepted for symmetry; see the module doc)."""
        return self.backbone(input_ids, mode="representation")

    def embed_pooled(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the representation over positions where ``attention_mask`` is 1: [B, d]."""
        return masked_mean(self.embed(input_ids), attention_mask)


class CrossDNAModel(CrossDNAPreTrainedModel):
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPooling | tuple:
        hidden = self.embed(input_ids)
        pooled = masked_mean(hidden, attention_mask)
        if return_dict is False:
            return hidden, pooled
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class CrossDNAForMaskedLM(CrossDNAPreTrainedModel):
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, return_dict: bool | None = None,
                **kwargs) -> MaskedLMOutput | tuple:
        logits = self.backbone(input_ids, mode="logits")
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)
