"""HuggingFace config of an exported CrossDNA model (copied into the export directory; imports nothing from crossdna).

``backbone`` is the full ``CrossDNAConfig`` as a dict. Token ids are model-space ids (spec §1.1): A=0 C=1 G=2 T=3
N=4. With ``alphabet_size`` 5 the mask token *is* N (id 4, as upstream pretraining masks: spec §1.3); with 6 the
model was trained with a dedicated [MASK]=5. Pads are N (id 4) in both cases: the stems see them as N, so pass an
``attention_mask`` to let pooling skip them.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class CrossDNAHFConfig(PretrainedConfig):
    model_type = "crossdna"

    def __init__(self, backbone: dict | None = None, mask_token_id: int | None = None, pad_token_id: int = 4,
                 **kwargs):
        self.backbone = dict(backbone or {})
        alphabet = int(self.backbone.get("alphabet_size", 5))
        self.vocab_size = alphabet
        self.num_bases = 5  # MLM output classes: A, C, G, T, N
        self.hidden_size = int(self.backbone.get("d_model", 128))
        self.mask_token_id = (4 if alphabet == 5 else 5) if mask_token_id is None else mask_token_id
        kwargs.pop("vocab_size", None)
        kwargs.pop("hidden_size", None)
        kwargs.pop("num_bases", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
