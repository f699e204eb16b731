"""``crossdna embed``: FASTA → per-record mean representation (.npy) or per-position (.npz), exact per record."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from crossdna import tokens
from crossdna.cli import main as cli_main
from crossdna.hf.weights import load_backbone, save_weights
from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def test_embed_fasta_matches_the_model_record_by_record(tmp_path, capsys):
    with open(FIXTURES / "nt_mini.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    picked = [r for r in rows if r["task"] == "promoter_all"][:2] + [r for r in rows if r["task"] == "enhancers"][:1]
    fasta = tmp_path / "records.fa"
    fasta.write_text("".join(f">{r['name']} {r['task']}\n{r['sequence'].lower()}\n" for r in picked))
    torch.manual_seed(0)
    model = SSScanDNAHybridModel(CrossDNAConfig.preset("tiny").replace(d_model=16, depth=1, use_ema_teacher=False))
    weights = save_weights(tmp_path / "w.safetensors", model.cfg, model.state_dict())

    assert cli_main(["embed", "--model", str(weights), "--fasta", str(fasta), "--out", str(tmp_path / "emb"),
                     "--tokens-per-batch", "700", "--quiet"]) == 0
    pooled = np.load(tmp_path / "emb.npy")
    assert pooled.shape == (3, 16)
    assert (tmp_path / "emb.ids.txt").read_text().split() == [r["name"] for r in picked]
    assert cli_main(["embed", "--model", str(weights), "--fasta", str(fasta), "--out", str(tmp_path / "emb"),
                     "--per-position", "--quiet"]) == 0
    full = np.load(tmp_path / "emb.npz")
    reference, _ = load_backbone(str(weights))
    reference.eval()
    for i, r in enumerate(picked):
        ids = torch.from_numpy(tokens.encode(r["sequence"])).long()[None]
        with torch.no_grad():
            want = reference(ids, mode="representation")[0].numpy()
        n = len(r["sequence"])
        assert full["lengths"][i] == n
        np.testing.assert_allclose(full["embeddings"][i, :n], want, atol=1e-5)
        assert not full["embeddings"][i, n:].any()
        np.testing.assert_allclose(pooled[i], want.mean(0), atol=1e-5)

    fasta.write_text(">bad\nACGT-A\n")
    assert cli_main(["embed", "--model", str(weights), "--fasta", str(fasta), "--out", str(tmp_path / "x")]) == 2
    assert "records.fa:1: invalid letter '-'" in capsys.readouterr().err
