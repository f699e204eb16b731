"""``crossdna embed``: FASTA records → representation vectors (.npy), from any model source.

Records are batched only with records of the same length, so no record is padded and every vector is exactly what
the model computes for that sequence alone (the backbone has no attention mask: pads would change the RC strand's
context). Output: ``OUT.npy`` float32 [N, d] (mean over positions), or with ``per_position`` an ``OUT.npz`` holding
``embeddings`` [N, Lmax, d] (zero after each record's end) and ``lengths`` [N]. Record names go to ``OUT.ids.txt``.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crossdna import tokens
from crossdna.finetune.readers import LetterPolicy, clean_sequence, fasta_records
from crossdna.finetune.trainer import resolve_device
from crossdna.hf.weights import load_backbone


def read_fasta_records(path: Path, letters: LetterPolicy) -> tuple[list[str], list[str]]:
    names, seqs = [], []
    for lineno, header, seq in fasta_records(path):
        names.append(header.split()[0] if header.split() else f"record{len(names)}")
        seqs.append(clean_sequence(seq, letters, f"{path}:{lineno}"))
    if not seqs:
        raise ValueError(f"{path}: no FASTA records")
    return names, seqs


def _save_atomic(path: Path, save) -> None:
    """``save(file_object)`` into a temporary file beside ``path``, renamed over it when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            save(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def embed_fasta(model_source: str, fasta: str | Path, out: str | Path, per_position: bool = False,
                tokens_per_batch: int = 65536, device: str = "auto", letters: LetterPolicy = "to_n",
                progress: bool = True) -> Path:
    fasta, out = Path(fasta), Path(out)
    names, seqs = read_fasta_records(fasta, letters)
    dev = resolve_device(device)
    model, _ = load_backbone(model_source, overrides=["use_ema_teacher=false"])
    model.to(dev).eval()
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        by_length[len(s)].append(i)
    d = model.cfg.d_model
    pooled = np.zeros((len(seqs), d), dtype=np.float32)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    full = np.zeros((len(seqs), int(lengths.max()), d), dtype=np.float32) if per_position else None
    bar = tqdm(total=len(seqs), desc="embed", unit="seq", disable=not progress)
    for length, index in sorted(by_length.items()):
        step = max(1, tokens_per_batch // length)
        for start in range(0, len(index), step):
            rows = index[start:start + step]
            ids = torch.from_numpy(np.stack([tokens.encode(seqs[i]) for i in rows])).long().to(dev)
            hidden = model(ids, mode="representation").float()
            pooled[rows] = hidden.mean(1).cpu().numpy()
            if full is not None:
                full[rows, :length] = hidden.cpu().numpy()
            bar.update(len(rows))
    bar.close()
    if per_position:
        out = out.with_suffix(".npz")
        _save_atomic(out, lambda fh: np.savez(fh, embeddings=full, lengths=lengths))
    else:
        out = out.with_suffix(".npy")
        _save_atomic(out, lambda fh: np.save(fh, pooled))
    ids_path = out.with_suffix(".ids.txt")
    _save_atomic(ids_path, lambda fh: fh.write("".join(f"{n}\n" for n in names).encode()))
    return out
