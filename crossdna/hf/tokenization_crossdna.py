"""Character tokenizer for CrossDNA (copied into the export directory; imports nothing from crossdna).

Ids are the model's own (spec §1.1): A=0 C=1 G=2 T=3 N=4, so ``input_ids`` go straight into the model (upstream's HF
tokenizer emitted 7..11 and the user had to subtract 7). Lower case is folded to upper case; every other letter
(IUPAC codes, ``X``) becomes N, as in pretraining. No CLS/SEP/EOS tokens are added.

Special tokens: ``[MASK]`` is id 4 (= N) for models pretrained with the upstream mask convention
(``dedicated_mask=False``; the model cannot tell a masked base from an N, spec §1.3) and id 5 for models trained with
a dedicated mask. ``[PAD]`` is id 4 (N): pads are read as N by the model, so always pass the ``attention_mask`` to
pooling. Decoding writes ids 0..4 as bases, never as ``[PAD]``/``[MASK]``.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizer

BASES = "ACGTN"
N_ID = 4


class CrossDNATokenizer(PreTrainedTokenizer):
    vocab_files_names: dict[str, str] = {}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, dedicated_mask: bool = False, padding_side: str = "right", **kwargs):
        self.dedicated_mask = bool(dedicated_mask)
        self._ids = {b: i for i, b in enumerate(BASES)}
        self._mask_id = 5 if self.dedicated_mask else N_ID
        # Fixed by the model; a saved tokenizer_config.json repeats them. Its added_tokens_decoder cannot hold
        # [PAD] and [MASK] both at id 4, so it is rebuilt here rather than read back.
        for name in ("mask_token", "pad_token", "unk_token", "added_tokens_decoder"):
            kwargs.pop(name, None)
        super().__init__(dedicated_mask=self.dedicated_mask, padding_side=padding_side, mask_token="[MASK]",
                         pad_token="[PAD]", unk_token="N", **kwargs)
        self._update_trie(["[MASK]", "[PAD]"])  # both split out of raw text even when they share id 4

    @property
    def vocab_size(self) -> int:
        return len(BASES) + (1 if self.dedicated_mask else 0)

    def get_vocab(self) -> dict[str, int]:
        return {**self._ids, "[PAD]": N_ID, "[MASK]": self._mask_id}

    def __len__(self) -> int:
        return self.vocab_size

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [c if c in self._ids else "N" for c in text.upper() if not c.isspace()]

    def _convert_token_to_id(self, token: str) -> int:
        if token == "[MASK]":
            return self._mask_id
        return self._ids.get(token.upper(), N_ID)

    def _convert_id_to_token(self, index: int) -> str:
        return "[MASK]" if index == 5 and self.dedicated_mask else BASES[index]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        return [self._convert_id_to_token(int(i)) for i in ids
                if not (skip_special_tokens and self.dedicated_mask and int(i) == 5)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return "".join(self.convert_ids_to_tokens(list(token_ids), skip_special_tokens=skip_special_tokens))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 else 0))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is fixed by the model (A C G T N [+ MASK]); nothing to write
