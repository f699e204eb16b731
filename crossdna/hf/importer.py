"""``crossdna import-upstream``: upstream CrossDNA weights → a consolidated weights file of this project.

Accepted sources:

* the upstream HF release directory (``chengCCC/CrossDNA_pretrain`` layout: ``config.json`` with ``d_model``,
  ``comba_cfg``, ``transformer_cfg``…, and ``model.safetensors`` or ``pytorch_model.bin`` with ``backbone.*`` keys);
* an upstream training state dict (``.safetensors``, or ``.pt``/``.bin``/``.ckpt`` loadable with
  ``torch.load(weights_only=True)``), keys bare or under ``model.`` / ``backbone.`` (Lightning's ``state_dict``).

Parameter names are the upstream ones (spec §2.11), so the import only strips prefixes, drops the Lightning
decoder/encoder, derives the config (from ``config.json``, else from tensor shapes plus the 8.1M defaults for what
shapes cannot tell: attention heads, window, RoPE base) and checks every tensor against the model it builds.
Token ids: upstream's HF tokenizer emits ``[CLS]0 [SEP]1 [BOS]2 [MASK]3 [PAD]4 [RESERVED]5 [UNK]6 A7 C8 G9 T10 N11``
and its README subtracts 7; ``upstream_ids_to_model`` does that mapping (everything outside 7..10 → N=4, as
upstream's datasets do, spec §1.2). Upstream's ``mask_token_id: 3`` is T in model space (spec §1.3) and is not used:
the imported model has ``alphabet_size`` 5, so its mask is N (id 4), as in upstream pretraining.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from crossdna import config as _config
from crossdna.hf.weights import apply_model_overrides, load_state, read_safetensors, save_weights
from crossdna.model import CompatConfig, CrossDNAConfig, SSScanDNAHybridModel

_PREFIXES = ("model.backbone.", "backbone.", "model.")
_DROPPED = ("decoder.", "encoder.", "model.decoder.", "model.encoder.")
UPSTREAM_TOKEN_OFFSET = 7


def upstream_ids_to_model(ids: torch.Tensor) -> torch.Tensor:
    """Upstream HF tokenizer ids → model ids: 7..11 → 0..4, every other id (CLS, SEP, PAD, UNK…) → N (4)."""
    out = ids.long() - UPSTREAM_TOKEN_OFFSET
    return torch.where((out < 0) | (out > 4), torch.full_like(out, 4), out)


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED)}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) (it pickles Python objects, e.g. "
                         f"Lightning hyper_parameters). In a trusted environment save its tensors only: "
                         f"torch.save(torch.load(p, weights_only=False)['state_dict'], 'state.pt') ({e})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or a checkpoint with 'state_dict')")
    return dict(obj)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    return _load_torch(path)


def config_from_upstream_json(up: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Upstream ``config.json`` / hydra model section → our CrossDNAConfig fields."""
    comba, tcfg = dict(up.get("comba_cfg") or {}), dict(up.get("transformer_cfg") or {})
    attn = dict(tcfg.get("attn") or {})
    if attn.get("num_kv_heads", attn.get("num_heads")) != attn.get("num_heads"):
        raise ValueError(f"{where}: transformer_cfg.attn.num_kv_heads != num_heads (grouped KV) is not supported")
    if attn.get("qkv_bias"):
        raise ValueError(f"{where}: transformer_cfg.attn.qkv_bias=true is not supported (the 8.1M model has none)")
    if up.get("alphabet_size", 5) != 5:
        raise ValueError(f"{where}: alphabet_size={up['alphabet_size']}; upstream models use 5 (A C G T N)")
    out: dict[str, Any] = {}
    for key in ("d_model", "depth", "block_size", "dropout", "bridge_dropout", "drop_path_rates", "use_bridge",
                "use_ema_teacher", "ema_decay", "gate_temp", "gate_freeze_steps"):
        if key in up:
            out[key] = up[key]
    out["comba"] = {k: comba[k] for k in ("num_heads", "head_dim", "expand_v", "conv_size", "correction_factor",
                                          "norm_eps") if k in comba}
    attention = {"num_heads": attn.get("num_heads"), "window_size": attn.get("window_size"),
                 "rope_theta": attn.get("rope_theta"), "hidden_ratio": tcfg.get("hidden_ratio"),
                 "norm_eps": tcfg.get("norm_eps")}
    out["attention"] = {k: v for k, v in attention.items() if v is not None}
    return out


def config_from_shapes(state: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """What the tensors determine; the rest stays at the 8.1M defaults (attention heads, window, RoPE base)."""
    comba = "branchA_core.layers.0.comba."
    needed = {"linear.weight": 3, comba + "A_log": 1, comba + "q_proj.weight": 2, comba + "v_proj.weight": 2,
              comba + "q_conv1d.weight": 3}
    bad = [f"{k} (need {n}-d)" for k, n in needed.items() if k not in state or state[k].ndim != n]
    if bad:
        raise ValueError(f"{where}: not an upstream CrossDNA state dict; missing or misshapen: {bad}")
    d, alphabet, kernel = state["linear.weight"].shape
    layers = {int(m.group(1)) for k in state for m in [re.match(r"branchA_core\.layers\.(\d+)\.", k)] if m}
    heads = state[comba + "A_log"].shape[0]
    head_dim = state[comba + "q_proj.weight"].shape[0] // heads
    return {
        "d_model": d, "depth": max(layers) + 1, "alphabet_size": alphabet, "stem_kernel": kernel,
        "use_bridge": any(k.startswith("bridge.") for k in state),
        "comba": {"num_heads": heads, "head_dim": head_dim,
                  "expand_v": state[comba + "v_proj.weight"].shape[0] / (heads * head_dim),
                  "conv_size": state[comba + "q_conv1d.weight"].shape[-1]},
    }


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, Mapping) else v
    return out


def read_upstream(source: str | Path, compat: str = "fixed", overrides: list[str] | tuple[str, ...] = ()
                  ) -> tuple[CrossDNAConfig, dict[str, torch.Tensor]]:
    """Upstream weights → (our config, our state dict), checked by loading into the model it describes."""
    path = Path(source)
    if path.is_dir():
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not files:
            raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin (an upstream HF release directory)")
        state = _strip(_read_state(files[0]))
        try:
            up = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / 'config.json'}: cannot read the upstream config: {e}") from e
        fields = _merge(config_from_shapes(state, str(files[0])),
                        config_from_upstream_json(up, str(path / "config.json")))
    elif path.is_file():
        state = _strip(_read_state(path))
        fields = config_from_shapes(state, str(path))
    else:
        raise ValueError(f"{path}: no such file or directory")
    fields["use_ema_teacher"] = any(k.startswith("branchA_core_ema.") for k in state)
    fields["compat"] = _config.to_dict(CompatConfig.upstream() if compat == "upstream" else CompatConfig())
    cfg = apply_model_overrides(_config.from_dict(CrossDNAConfig, fields, f"{path} (derived config)"), overrides)
    model = SSScanDNAHybridModel(cfg)
    load_state(model, state, str(path))  # shape/key check; also rewrites P_comp to this config's permutation
    return cfg, model.state_dict()


def import_upstream(source: str | Path, out_path: str | Path, compat: str = "fixed",
                    overrides: list[str] | tuple[str, ...] = ()) -> Path:
    cfg, state = read_upstream(source, compat, overrides)
    return save_weights(out_path, cfg, state, {"imported_from": str(Path(source).resolve()),
                                              "token_ids": "upstream HF tokenizer ids 7..11 -> 0..4"})
