"""HF export: self-contained directory, AutoModel/AutoTokenizer load without this package, logit parity."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from crossdna.hf.export import PARITY_TOLERANCE, export, parity_check, probe_ids
from crossdna.hf.weights import load_backbone, save_weights
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel

# The `tiny` preset, smaller still: the point is the plumbing, and CPU time in CI is shared.
SMALL = CrossDNAConfig.preset("tiny").replace(d_model=16, depth=1, block_size=512)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = SSScanDNAHybridModel(SMALL)
    model.set_step(123)  # a trained model's gate step must survive the trip
    weights = save_weights(root / "weights.safetensors", model.cfg, model.state_dict())
    return weights, export(str(weights), root / "hf")


def _offline_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    return env


_LOAD_WITHOUT_CROSSDNA = textwrap.dedent("""
    import importlib.abc, os, sys
    class BlockCrossdna(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "crossdna" or name.startswith("crossdna."):
                raise ModuleNotFoundError(f"blocked {name}")
    sys.meta_path.insert(0, BlockCrossdna())
    # Drop the checkout itself (not what lies below it: `make` puts .venv, and with it torch, inside the checkout).
    sys.path = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != os.path.realpath(sys.argv[3])]
    try:
        import crossdna
        raise SystemExit("crossdna is importable; the test would not prove self-containment")
    except ModuleNotFoundError:
        pass
    import torch
    compile_before = torch.compile
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    mlm = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    batch = tok(["acgtRN", "AC[MASK]G"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = {"logits": mlm(ids).logits, "embed": mlm.embed(ids), "hidden": base(ids).last_hidden_state,
               "pooled": mlm.embed_pooled(batch["input_ids"], batch["attention_mask"]),
               "pooled_ref": mlm.embed(batch["input_ids"])[1, :4].mean(0)}
    out["tok"] = torch.tensor([tok.mask_token_id, tok.pad_token_id, len(tok)])
    out["batch"] = batch["input_ids"]
    out["step"] = torch.tensor(mlm.backbone.step)
    assert torch.compile is compile_before, "the export patched torch.compile"
    torch.save(out, sys.argv[2] + ".out")
    print(sorted(m for m in sys.modules if m == "crossdna" or m.startswith("crossdna.")))
""")


def test_export_directory_layout(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "modeling_crossdna.py",
            "configuration_crossdna.py", "tokenization_crossdna.py", "crossdna_model_hybrid.py",
            "crossdna_ops_comba.py", "README.md"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForMaskedLM"] == "modeling_crossdna.CrossDNAForMaskedLM"
    assert cfg["mask_token_id"] == 4 and cfg["pad_token_id"] == 4 and cfg["backbone"]["use_ema_teacher"] is False
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["auto_map"]["AutoTokenizer"][0] == "tokenization_crossdna.CrossDNATokenizer"
    for f in out.glob("*.py"):
        text = f.read_text()
        assert not re.search(r"torch\.compile\s*=", text), f.name
        assert not re.search(r"^\s*(from|import)\s+crossdna\b", text, re.MULTILINE), f.name
        # nothing printed at import: no module-level print call
        assert not any(line.startswith("print(") for line in text.splitlines()), f.name


def test_loads_without_the_package_with_parity(exported, tmp_path, repo_root):
    weights, out = exported
    ids = probe_ids()
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_CROSSDNA, str(out), str(tmp_path / "ids.pt"),
                           str(repo_root)], cwd=tmp_path, env=_offline_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"  # nothing printed at import, and no module of the package was imported
    got = torch.load(tmp_path / "ids.pt.out")
    reference, _ = load_backbone(str(weights), overrides=["use_ema_teacher=false"])
    reference.eval()
    with torch.no_grad():
        want_logits = reference(ids, mode="logits")
        want_hidden = reference(ids, mode="representation")
    assert got["logits"].shape == (2, ids.shape[1], 5)
    assert (got["logits"] - want_logits).abs().max() <= PARITY_TOLERANCE
    assert (got["embed"] - want_hidden).abs().max() <= PARITY_TOLERANCE
    assert (got["hidden"] - want_hidden).abs().max() <= PARITY_TOLERANCE
    assert int(got["step"]) == 123
    assert got["tok"].tolist() == [4, 4, 5]  # upstream-mask model: [MASK] = N = 4, pads are N
    assert got["batch"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 1, 4, 2, 4, 4]]
    torch.testing.assert_close(got["pooled"][1], got["pooled_ref"])  # pooling skips the pads


def test_parity_check_detects_a_wrong_export(exported, tmp_path):
    weights, out = exported
    assert parity_check(str(weights), out) <= PARITY_TOLERANCE
    other = SSScanDNAHybridModel(SMALL)
    other_weights = save_weights(tmp_path / "other.safetensors", other.cfg, other.state_dict())
    with pytest.raises(ValueError, match="logits differ"):
        parity_check(str(other_weights), out)


def test_dedicated_mask_tokenizer_and_overwrite_guard(tmp_path):
    from crossdna.hf.tokenization_crossdna import CrossDNATokenizer

    model = SSScanDNAHybridModel(SMALL.replace(alphabet_size=6))
    weights = save_weights(tmp_path / "w.safetensors", model.cfg, model.state_dict())
    out = export(str(weights), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == 5
    tok = CrossDNATokenizer.from_pretrained(out)
    assert tok("AC[MASK]g")["input_ids"] == [0, 1, 5, 2]
    assert tok.decode([0, 5, 4]) == "A[MASK]N" and tok.decode([0, 5, 4], skip_special_tokens=True) == "AN"
    with pytest.raises(ValueError, match="already exists"):
        export(str(weights), out)


def test_export_refuses_a_file_that_is_not_a_crossdna_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a consolidated CrossDNA weights file"):
        export(str(tmp_path / "plain.safetensors"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
