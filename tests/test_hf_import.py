"""Upstream-layout import: HF release directory and training state dicts → our weights, identical outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crossdna import config as _config
from crossdna.hf.export import probe_ids
from crossdna.hf.importer import import_upstream, upstream_ids_to_model
from crossdna.hf.weights import load_backbone
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel

# Upstream's wrong complement permutation (defect 6) as stored in its P_comp buffer.
UPSTREAM_P_COMP = torch.nn.functional.one_hot(torch.tensor([3, 0, 2, 1, 4]), 5).float()


@pytest.fixture(scope="module")
def upstream_model() -> SSScanDNAHybridModel:
    torch.manual_seed(1)
    cfg = CrossDNAConfig.preset("tiny").replace(d_model=16, depth=2, block_size=512)
    model = SSScanDNAHybridModel(cfg).eval()
    model.set_step(13_600)  # upstream finetuning inherits the pretraining g_step
    return model


def _upstream_state(model: SSScanDNAHybridModel) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["P_comp"] = UPSTREAM_P_COMP.clone()
    return state


def _upstream_hf_config(cfg: CrossDNAConfig) -> dict:
    """The upstream HF release config.json fields (modeling_crossdna.py CrossDNAForMaskedLM)."""
    return {
        "model_type": "crossdna", "alphabet_size": 5, "d_model": cfg.d_model, "depth": cfg.depth,
        "block_size": cfg.block_size, "pretrain": True, "for_representation": False, "use_s_scan": True,
        "drop_path_rates": [0.0, 0.05], "dropout": 0.15, "gate_freeze_steps": cfg.gate_freeze_steps, "gate_temp": 2.0,
        "use_bridge": True, "mask_token_id": 3, "pad_token_id": 4, "vocab_size": 5,
        "comba_cfg": {"hidden_size": cfg.d_model, "expand_v": 1, "head_dim": cfg.comba.head_dim,
                      "num_heads": cfg.comba.num_heads, "use_gate": True, "mode": "chunk", "use_short_conv": True,
                      "correction_factor": 0.02, "conv_size": 4, "norm_eps": 1e-5},
        "transformer_cfg": {"hidden_size": cfg.d_model, "norm_eps": 1e-5, "max_position_embeddings": 1024,
                            "hidden_ratio": 4.0, "hidden_act": "swish", "fuse_swiglu": True,
                            "attn": {"num_heads": cfg.attention.num_heads, "num_kv_heads": cfg.attention.num_heads,
                                     "qkv_bias": False, "window_size": cfg.attention.window_size,
                                     "rope_theta": 10000}},
    }


def _logits(source: str | Path) -> torch.Tensor:
    model, _ = load_backbone(str(source))
    with torch.no_grad():
        return model.eval()(probe_ids(), mode="logits")


def test_hf_release_directory_roundtrip(upstream_model, tmp_path):
    release = tmp_path / "CrossDNA_pretrain" / "8.1M"
    release.mkdir(parents=True)
    state = {f"backbone.{k}": v for k, v in _upstream_state(upstream_model).items()}
    save_file(state, str(release / "model.safetensors"))
    (release / "config.json").write_text(json.dumps(_upstream_hf_config(upstream_model.cfg)))
    out = import_upstream(release, tmp_path / "imported.safetensors")
    with torch.no_grad():
        want = upstream_model(probe_ids(), mode="logits")
    assert torch.equal(_logits(out), want)
    imported, _ = load_backbone(str(out))
    assert imported.step == 13_600
    assert imported.cfg.attention.window_size == upstream_model.cfg.attention.window_size
    assert torch.equal(imported.P_comp, upstream_model.P_comp)  # rebuilt from the correct permutation


def test_lightning_state_dict_with_prefix_and_decoder(upstream_model, tmp_path):
    state = {f"model.{k}": v for k, v in _upstream_state(upstream_model).items()}
    state["decoder.0.output_transform.weight"] = torch.zeros(2, upstream_model.cfg.d_model)
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    # Attention heads and the window are not visible in tensor shapes: given as overrides, like the CLI's KEY=VALUE.
    cfg = upstream_model.cfg
    out = import_upstream(tmp_path / "last.ckpt", tmp_path / "imported.safetensors",
                          overrides=[f"attention.num_heads={cfg.attention.num_heads}",
                                     f"attention.window_size={cfg.attention.window_size}",
                                     f"block_size={cfg.block_size}", f"gate_freeze_steps={cfg.gate_freeze_steps}"])
    with torch.no_grad():
        want = upstream_model(probe_ids(), mode="logits")
    assert torch.equal(_logits(out), want)
    assert _config.to_dict(load_backbone(str(out))[0].cfg)["use_ema_teacher"] is True  # EMA keys were present


def test_import_errors_are_clear(upstream_model, tmp_path):
    torch.save({"state_dict": {"model.linear.weight": torch.zeros(3)}, "hyper_parameters": {"lr": 1e-3}},
               tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="branchA_core"):
        import_upstream(tmp_path / "bad.ckpt", tmp_path / "o.safetensors")
    state = _upstream_state(upstream_model)
    del state["bridge.gate.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['bridge.gate.weight'\]"):
        import_upstream(tmp_path / "partial.safetensors", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_upstream_token_ids_map_to_model_ids():
    # [CLS]0 [SEP]1 [BOS]2 [MASK]3 [PAD]4 [RESERVED]5 [UNK]6 A7 C8 G9 T10 N11
    ids = torch.arange(12)
    assert upstream_ids_to_model(ids).tolist() == [4, 4, 4, 4, 4, 4, 4, 0, 1, 2, 3, 4]


def test_cli_import_then_export(upstream_model, tmp_path, capsys):
    from crossdna.cli import main as cli_main

    save_file(_upstream_state(upstream_model), str(tmp_path / "upstream.safetensors"))
    cfg = upstream_model.cfg
    args = ["--set", f"attention.num_heads={cfg.attention.num_heads}",
            "--set", f"attention.window_size={cfg.attention.window_size}", "--set", f"block_size={cfg.block_size}"]
    assert cli_main(["import-upstream", str(tmp_path / "upstream.safetensors"), "--out",
                     str(tmp_path / "ours.safetensors"), *args]) == 0
    assert cli_main(["export", "--model", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "hf")]) == 0
    assert "parity: max |logit difference| = 0.00e+00" in capsys.readouterr().out
    assert cli_main(["export", "--model", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
