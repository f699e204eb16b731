"""Analytic FLOP count of a CrossDNA pretraining step (for MFU), by component.

Counted: the matrix products of every layer (2 FLOPs per multiply-add), convolutions included, and the Comba chunk
algorithm; not counted: elementwise work (norms, gates, activations, losses), which is memory-bound and which
``torch.utils.flop_counter`` does not count either. Notation (the 8.1M preset): d = 128 model width, n = 6 layers
per branch; Comba H = 8 heads of K = V = 64, chunk C = 64; attention h·dh = d, window W; SwiGLU width m = 512.

Forward FLOPs per token of one branch layer:

* Comba projections: q, k, v, g: 4·2·d·HK; a, b: 2·2·d·H; o_proj: 2·HV·d; short convs: 3·2·HK·4.
* Comba kernel (``kernel="fla"``, the WY chunk algorithm as fla runs it), per chunk and head:
  A = PKᵀ (2C²K), (I+A)⁻¹ (C³/3), W, U (2C²K + 2C²V), states (2·2CKV), output QH, QKᵀ, (QKᵀ)U (2CKV + 2C²K + 2C²V);
  ``kernel="reference"`` counts the products of :func:`crossdna.ops.comba.chunk_comba` instead (PKᵀ, QKᵀ,
  W·S, Q·S, (QKᵀ)U, Kᵀ·U; its triangular solve is not a matrix product and is not counted), which is what
  ``FlopCounterMode`` sees when the reference kernels run (fla's Triton kernels are invisible to it).
* attention: q, k, v, o: 4·2·d²; scores and values: 2·2·d·n_keys, with n_keys the mean number of keys a query
  sees: (W(W+1)/2 + (l−W)·W)/l for the causal band (``attention="band"``, the work a block-sparse kernel does),
  or l (``attention="dense"``: what SDPA with a dense mask computes, and what ``FlopCounterMode`` counts).
* SwiGLU: 3·2·d·m; fusion gate: 2·2d·d.

Per token, outside the branches: stems 2·(2·A·9·d) (A input channels); TokenBridge: depthwise convs
2·5·2·9·d, 1×1 mixes 2·2·5d·d, projections 2·2·d², gate 2·4d·2d, global projections 2·2·d² per sequence;
heads: proj_A/B 2·2·(2·d·2d), gate_fuse 2·2d·d (once the gate is unfrozen), out_linear 2·d·5 (+2 under no_grad
for the per-branch metrics logits). The semantic loss has no products unless the Gram term is on.

A training step = student forward + backward + teacher forward. The backward of a product is counted as twice
its forward (input and weight gradients), except where the input needs no gradient: the stems read one-hot ids,
so their backward is 1×. The teacher (both EMA branches on the forward and RC strands, [2B] rows, and its
bridge) runs forward only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from crossdna.model import CrossDNAConfig

PEAK_BF16_DENSE = {  # FLOP/s, dense (no sparsity), from the vendor datasheets
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,
    "A100": 312.0e12,
}


def peak_flops(device_name: str) -> float | None:
    """bf16 dense peak of a CUDA device by name (``torch.cuda.get_device_name``), None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_DENSE["H200"]
    if "H100" in name:
        return PEAK_BF16_DENSE["H100 PCIe" if "PCIE" in name else "H100 SXM"]
    if "A100" in name:
        return PEAK_BF16_DENSE["A100"]
    return None


def mean_band_keys(length: int, window: int) -> float:
    """Mean number of keys a query attends in a causal window of ``window`` keys over ``length`` positions."""
    w = min(window, length)
    return (w * (w + 1) / 2 + (length - w) * w) / length


def comba_kernel_flops_per_chunk(cfg: CrossDNAConfig, kernel: str = "fla") -> float:
    """One chunk of one head, forward."""
    C, K, V = cfg.comba.chunk_size, cfg.comba.head_dim, cfg.comba.head_v_dim
    if kernel == "fla":
        return 2 * C * C * K + C ** 3 / 3 + 2 * C * C * (K + V) + 4 * C * K * V + 2 * C * K * V + 2 * C * C * (K + V)
    if kernel == "reference":
        return 2 * C * C * K * 2 + 2 * C * K * V * 3 + 2 * C * C * V
    raise ValueError(f"kernel={kernel!r} is not 'fla' or 'reference'")


def branch_layer_flops(cfg: CrossDNAConfig, length: int, *, attention: str = "band", kernel: str = "fla") -> dict:
    """Forward FLOPs of one EnhancedHybridCore on one sequence block of ``length`` tokens, by part."""
    d, cb, at = cfg.d_model, cfg.comba, cfg.attention
    hk, hv = cb.num_heads * cb.head_dim, cb.num_heads * cb.head_v_dim
    chunks = math.ceil(length / cb.chunk_size)
    if attention == "band":
        keys = mean_band_keys(length, at.window_size)
    elif attention == "dense":
        keys = length
    else:
        raise ValueError(f"attention={attention!r} is not 'band' or 'dense'")
    return {
        "comba_proj": length * (2 * 2 * d * hk + 2 * 2 * d * hv + 2 * 2 * d * cb.num_heads + 2 * hv * d
                                + 2 * 2 * hk * cb.conv_size + 2 * hv * cb.conv_size),
        "comba_kernel": chunks * cb.num_heads * comba_kernel_flops_per_chunk(cfg, kernel),
        "attention_proj": length * 4 * 2 * d * d,
        "attention_core": length * 2 * 2 * d * keys,
        "mlp": length * 3 * 2 * d * cfg.mlp_hidden,
        "gate": length * 2 * 2 * d * d,
    }


def bridge_flops(cfg: CrossDNAConfig, length: int) -> float:
    d, dil, kernel = cfg.d_model, 5, 9
    per_token = 2 * dil * 2 * kernel * d + 2 * 2 * dil * d * d + 2 * 2 * d * d + 2 * 4 * d * 2 * d
    return length * per_token + 2 * 2 * d * d  # + the two global-token projections, once per block


def _blocks(length: int, block_size: int) -> list[int]:
    full, tail = divmod(length, block_size)
    return [block_size] * full + ([tail] if tail else [])


def _passes(cfg: CrossDNAConfig, length: int, gate_frozen: bool, gram: str, attention: str, kernel: str) -> dict:
    """Forward FLOPs of each piece of the model on one sequence of ``length`` tokens."""
    d = cfg.d_model
    blocks = _blocks(length, cfg.block_size)
    branch: dict[str, float] = {}
    for l in blocks:
        for key, value in branch_layer_flops(cfg, l, attention=attention, kernel=kernel).items():
            branch[key] = branch.get(key, 0.0) + cfg.depth * value
    return {
        "branch": branch,                                                  # one branch pass
        "bridge": sum(bridge_flops(cfg, l) for l in blocks) if cfg.use_bridge else 0.0,
        "stems": 2 * length * 2 * cfg.alphabet_size * cfg.stem_kernel * d,
        "heads": length * (2 * 2 * (2 * d * 2 * d) + (0 if gate_frozen else 2 * 2 * d * d) + 2 * d * 5),
        "metrics": length * 2 * 2 * d * 5,                                 # logits_a, logits_b under no_grad
        "gram": {"off": 0.0,                                               # Gram(H) + Gram(R), one branch
                 "exact": sum(2 * 2 * l * l * d for l in blocks),
                 "fast": sum(3 * 2 * d * l * d for l in blocks)}[gram],
    }


def train_step_flops(cfg: CrossDNAConfig, batch: int, length: int, *, teacher: bool = True, gate_frozen: bool = False,
                     gram: str = "off", attention: str = "band", kernel: str = "fla") -> dict:
    """FLOPs of one training step on [batch, length] by component; ``total`` is the sum.

    ``gram``: the semantic loss's Gram term as ``ObjectiveConfig.gram`` ("off", "exact" or "fast").
    """
    p = _passes(cfg, length, gate_frozen, gram, attention, kernel)
    out = {}
    for key, value in p["branch"].items():
        out[f"student_{key}"] = batch * 2 * 3 * value                  # 2 branches, forward + 2× backward
        if teacher:
            out[f"teacher_{key}"] = 2 * batch * 2 * value              # 2 EMA branches on [2B] rows
    out["student_bridge"] = batch * 3 * p["bridge"]
    if teacher:
        out["teacher_bridge"] = 2 * batch * p["bridge"]
    out["stems"] = batch * 2 * p["stems"]                              # backward: weight gradient only
    out["heads"] = batch * (3 * p["heads"] + p["metrics"])
    if teacher and gram != "off":
        out["gram"] = batch * 2 * 2 * p["gram"]                        # 2 branches; forward + backward of Gram(H)
    out["total"] = sum(out.values())
    return out


def forward_flops(cfg: CrossDNAConfig, batch: int, length: int, *, teacher: bool = True, gate_frozen: bool = False,
                  attention: str = "band", kernel: str = "fla") -> float:
    """FLOPs of one ``mode="pretrain"`` forward (teacher included when ``teacher``), no loss."""
    p = _passes(cfg, length, gate_frozen, "off", attention, kernel)
    branch = sum(p["branch"].values())
    student = batch * (2 * branch + p["bridge"] + p["stems"] + p["heads"] + p["metrics"])
    return student + (2 * batch * (2 * branch + p["bridge"]) if teacher else 0.0)


@dataclass
class Utilisation:
    flops_per_step: float
    achieved: float          # FLOP/s
    mfu: float | None        # achieved / peak (None when the peak of the device is unknown)


def utilisation(flops_per_step: float, seconds_per_step: float, device_name: str) -> Utilisation:
    achieved = flops_per_step / seconds_per_step
    peak = peak_flops(device_name)
    return Utilisation(flops_per_step, achieved, achieved / peak if peak else None)
