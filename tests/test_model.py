"""The CrossDNA backbone: upstream parameter layout, modes, S-scan alignment, teacher, EMA, gate freeze, inputs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from crossdna.model import (CompatConfig, CrossDNAConfig, PretrainOutput, SSScanDNAHybridModel, count_parameters,
                            validate_input_ids)
from crossdna.objectives import ObjectiveConfig, pretrain_loss
from crossdna.tokens import COMPLEMENT

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ------------------------------------------------------------------------------------------------ upstream layout
def _upstream_keys(depth: int = 6) -> set[str]:
    """The upstream state_dict key set, written out from spec §2.4 (Comba parameters), §2.5 (SWA block), §2.7
    (TokenBridge), §2.8 (heads) and §8 (key list incl. buffers g_step, P_comp) — independently of our model."""
    comba = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "decay", "D",
             "A_log", "dt_bias", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "g_proj.weight",
             "o_norm.weight", "o_proj.weight"]
    swa = ["mixer_norm.weight", "mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight",
           "mixer.o_proj.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
           "mlp.down_proj.weight"]
    core = ([f"comba.{k}" for k in comba] + [f"transformer.{k}" for k in swa]
            + ["gate.weight", "gate.bias", "out_norm.weight", "out_norm.bias"])
    branch = [f"layers.{i}.{k}" for i in range(depth) for k in core] + ["output_norm.weight", "output_norm.bias"]
    bridge = ([f"dw_{s}.{i}.weight" for s in "AB" for i in range(5)]
              + [f"{m}.{p}" for m in ("mix_A", "mix_B", "proj_A2B", "proj_B2A", "glb_A2B", "glb_B2A", "gate",
                                      "normA", "normB") for p in ("weight", "bias")])
    keys = {"g_step", "P_comp"}
    keys |= {f"{m}.{p}" for m in ("linear", "rc_linear", "proj_A.linear1", "proj_A.linear2", "proj_B.linear1",
                                  "proj_B.linear2", "gate_fuse", "out_linear") for p in ("weight", "bias")}
    for name in ("branchA_core", "branchB_core", "branchA_core_ema", "branchB_core_ema"):
        keys |= {f"{name}.{k}" for k in branch}
    for name in ("bridge", "bridge_ema"):
        keys |= {f"{name}.{k}" for k in bridge}
    return keys


@pytest.fixture(scope="module")
def meta_8m() -> SSScanDNAHybridModel:
    with torch.device("meta"):
        return SSScanDNAHybridModel(CrossDNAConfig.preset("8m"))


def test_8m_parameter_count(meta_8m):
    assert count_parameters(meta_8m) == {"trainable": 8_129_413, "ema": 7_952_256, "total": 16_081_669}
    per_module = {name: sum(p.numel() for p in module.parameters()) for name, module in meta_8m.named_children()}
    assert per_module["linear"] == per_module["rc_linear"] == 5_888          # spec §2.11 table
    assert per_module["branchA_core"] == per_module["branchB_core"] == 3_789_376
    assert per_module["bridge"] == 373_504
    assert per_module["proj_A"] == per_module["proj_B"] == 65_920
    assert per_module["gate_fuse"] == 32_896 and per_module["out_linear"] == 645
    core = meta_8m.branchA_core.layers[0]
    assert sum(p.numel() for p in core.comba.parameters()) == 335_968
    assert sum(p.numel() for p in core.transformer.parameters()) == 262_400


def test_8m_state_dict_keys_and_shapes_are_upstreams(meta_8m):
    sd = meta_8m.state_dict()
    assert set(sd) == _upstream_keys()
    comba = "branchA_core.layers.3.comba."
    shapes = {"q_proj.weight": (512, 128), "v_proj.weight": (512, 128), "a_proj.weight": (8, 128), "decay": (8,),
              "D": (8,), "A_log": (8,), "dt_bias": (8,), "q_conv1d.weight": (512, 1, 4), "g_proj.weight": (512, 128),
              "o_norm.weight": (64,), "o_proj.weight": (128, 512)}
    for key, shape in shapes.items():
        assert tuple(sd[comba + key].shape) == shape, key
    assert tuple(sd["branchB_core.layers.0.transformer.mlp.gate_proj.weight"].shape) == (512, 128)
    assert tuple(sd["bridge.dw_A.4.weight"].shape) == (128, 1, 9)
    assert tuple(sd["bridge.gate.weight"].shape) == (256, 512)
    assert sd["g_step"].dtype == torch.long and tuple(sd["g_step"].shape) == (1,)
    assert tuple(sd["P_comp"].shape) == (5, 5)
    assert all(not p.requires_grad for p in meta_8m.ema_parameters())


def test_strict_load_restores_step_and_keeps_the_configured_complement():
    cfg = CrossDNAConfig.preset("tiny")
    src = SSScanDNAHybridModel(cfg)
    src.set_step(1234)
    sd = src.state_dict()
    sd["P_comp"] = F.one_hot(torch.tensor([3, 0, 2, 1, 4]), 5).float()  # what an upstream checkpoint carries
    dst = SSScanDNAHybridModel(cfg)
    dst.load_state_dict(sd, strict=True)
    assert dst.step == 1234
    assert dst.P_comp.argmax(-1).tolist() == [3, 2, 1, 0, 4]
    upstream = SSScanDNAHybridModel(cfg.replace(compat=CompatConfig(complement_permutation="upstream")))
    assert upstream.P_comp.argmax(-1).tolist() == [3, 0, 2, 1, 4]


def test_meta_construction_then_init_weights_matches_a_fresh_model():
    cfg = CrossDNAConfig.preset("tiny")
    with torch.device("meta"):
        model = SSScanDNAHybridModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.step == 0 and model.g_step.item() == 0
    for (name, p), (_, q) in zip(model.named_student_parameters(), model.named_parameters()):
        assert torch.isfinite(p).all(), name
    for ema, student in zip(model.branchA_core_ema.parameters(), model.branchA_core.parameters()):
        assert torch.equal(ema, student)
    comba = model.branchA_core.layers[0].comba
    assert torch.equal(comba.D, torch.full_like(comba.D, 0.02)) and (comba.A_log.exp() <= 16).all()


# -------------------------------------------------------------------------------------------------- tiny models
def _tiny(**changes) -> SSScanDNAHybridModel:
    torch.manual_seed(0)
    return SSScanDNAHybridModel(CrossDNAConfig.preset("tiny").replace(**changes))


def _ids(B: int, L: int, seed: int = 1, high: int = 5) -> torch.Tensor:
    return torch.randint(0, high, (B, L), generator=torch.Generator().manual_seed(seed))


def test_modes_shapes_and_determinism():
    model = _tiny().eval()
    ids = _ids(3, 100)  # one full block of 64 + a tail of 36
    logits = model(ids)
    rep = model(ids, mode="representation")
    out = model(ids, mode="pretrain")
    assert logits.shape == (3, 100, 5) and rep.shape == (3, 100, 32)
    assert isinstance(out, PretrainOutput)
    assert torch.equal(out.logits, logits) and torch.equal(model.out_linear(rep), logits)
    for t in (out.fa, out.fb, out.target_a, out.target_b):
        assert t.shape == (3, 100, 32)
    assert out.logits_a.shape == (3, 100, 5) and not out.logits_a.requires_grad
    assert out.a_is_rc.tolist() == [False] * 64 + [True] * 36
    assert torch.equal(model(ids), logits)  # deterministic in eval
    model.train()
    torch.manual_seed(5)
    a = model(ids)
    torch.manual_seed(5)
    assert torch.equal(model(ids), a)  # deterministic given the seed in train (dropout)
    with pytest.raises(ValueError, match="mode"):
        model(ids, mode="embeddings")


def test_input_validation_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="int64"):
        model(_ids(2, 10).float())
    with pytest.raises(ValueError, match="int64"):
        model(_ids(2, 10).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(_ids(2, 10)[0])
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(_ids(2, 10)[None])
    with pytest.raises(ValueError, match="empty"):
        model(_ids(2, 10)[:, :0])
    bad = _ids(2, 10)
    bad[1, 3] = 5
    with pytest.raises(ValueError, match=r"0\.\.4 .*\[0, 5\]"):
        model(bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"\[-1, 4\]"):
        validate_input_ids(bad, 5)
    with pytest.raises(ValueError, match="ids must be in 0..4"):
        model.validate_inputs(_ids(2, 10, high=6).clamp(min=4) + 1)


def test_dedicated_mask_id():
    model = _tiny(alphabet_size=6).eval()
    assert tuple(model.linear.weight.shape) == (32, 6, 9) and model.out_linear.out_features == 5
    ids = _ids(2, 50, high=6)
    assert (ids == 5).any()
    assert model(ids).shape == (2, 50, 5)
    # The mask id is its own complement: the RC strand keeps [MASK] where the forward strand has it.
    assert COMPLEMENT[5] == 5 and model.id_complement.tolist() == [3, 2, 1, 0, 4, 5]
    bad = ids.clone()
    bad[0, 0] = 6
    with pytest.raises(ValueError, match=r"0\.\.5 \(A,C,G,T,N,MASK\)"):
        model(bad)


# ---------------------------------------------------------------------------------------- S-scan and alignment
def _per_block_loop(model: SSScanDNAHybridModel, ids: torch.Tensor) -> torch.Tensor:
    """Upstream's Python loop over blocks (crossdna.py:571-632) in eval mode, with the configured RC slicing."""
    L, l = ids.shape[1], model.cfg.block_size
    comp = torch.tensor(COMPLEMENT[:model.cfg.alphabet_size].astype("int64"))
    feat = F.gelu(model.linear(F.one_hot(ids, model.cfg.alphabet_size).float().transpose(1, 2))).transpose(1, 2)
    rc_feat = F.gelu(model.rc_linear(F.one_hot(comp[ids].flip(1), model.cfg.alphabet_size).float()
                                     .transpose(1, 2))).transpose(1, 2)
    fused = []
    for t, s in enumerate(range(0, L, l)):
        e = min(s + l, L)
        x_fwd = feat[:, s:e]
        x_rc = rc_feat[:, s:e] if model.cfg.compat.rc_alignment == "upstream" else rc_feat[:, L - e:L - s]
        x_a, x_b = (x_fwd, x_rc) if t % 2 == 0 else (x_rc, x_fwd)
        h_a, h_b = model.branchA_core(x_a), model.branchB_core(x_b)
        h_a, h_b = (h_a, h_b.flip(1)) if t % 2 == 0 else (h_a.flip(1), h_b)
        h_a, h_b = model.bridge(h_a, h_b)
        fa, fb = model.proj_A(h_a), model.proj_B(h_b)
        g = torch.sigmoid(model.gate_fuse(torch.cat([fa, fb], -1)) / model.cfg.gate_temp)
        fused.append(F.layer_norm(g * fa + (1 - g) * fb, (fa.shape[-1],)))
    return torch.cat(fused, 1)


@pytest.mark.parametrize("alignment", ["aligned", "upstream"])
def test_batched_blocks_equal_the_per_block_loop(alignment):
    model = _tiny(compat=CompatConfig(rc_alignment=alignment)).eval()
    ids = _ids(2, 64 * 3 + 20)  # 3 full blocks (even, odd, even) + a tail (odd)
    with torch.no_grad():
        assert torch.allclose(model(ids, mode="representation"), _per_block_loop(model, ids), atol=1e-5)


def test_blocks_are_independent_beyond_the_stem_halo_only_when_aligned():
    ids = _ids(2, 128)
    changed = ids.clone()
    changed[:, 100] = (changed[:, 100] + 1) % 4  # block 1, far from the block boundary (stem halo is ±4)
    aligned = _tiny().eval()
    with torch.no_grad():
        a, b = aligned(ids, mode="representation"), aligned(changed, mode="representation")
    assert torch.equal(a[:, :64], b[:, :64])
    assert not torch.equal(a[:, 64:], b[:, 64:])
    near = ids.clone()
    near[:, 66] = (near[:, 66] + 1) % 4  # within the halo: block 0 sees it through the stems
    with torch.no_grad():
        assert not torch.equal(aligned(near, mode="representation")[:, :64], a[:, :64])
    upstream = _tiny(compat=CompatConfig(rc_alignment="upstream")).eval()
    with torch.no_grad():
        a, b = upstream(ids, mode="representation"), upstream(changed, mode="representation")
    assert (a[:, :64] - b[:, :64]).abs().amax(-1).gt(0).all()  # defect 1: every position of block 0 moves


# ------------------------------------------------------------------------------------------------------ teacher
def _four_pass_targets(model: SSScanDNAHybridModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's teacher (crossdna.py:635-663): 4 teacher branch passes and 2 bridge passes per block."""
    L, l = ids.shape[1], model.cfg.block_size
    comp = torch.tensor(COMPLEMENT[:5].astype("int64"))
    a_feat = F.gelu(model.linear(F.one_hot(ids, 5).float().transpose(1, 2))).transpose(1, 2)
    b_feat = F.gelu(model.rc_linear(F.one_hot(comp[ids].flip(1), 5).float().transpose(1, 2))).transpose(1, 2)
    ta, tb = [], []
    with torch.no_grad():
        for t, s in enumerate(range(0, L, l)):
            e = min(s + l, L)
            fwd, rc = a_feat[:, s:e], b_feat[:, L - e:L - s]
            plus_a, plus_b = model.bridge_ema(model.branchA_core_ema(fwd), model.branchB_core_ema(fwd))
            minus_a, minus_b = model.bridge_ema(model.branchA_core_ema(rc).flip(1), model.branchB_core_ema(rc).flip(1))
            ta.append(minus_a if t % 2 else plus_a)
            tb.append(plus_b if t % 2 else minus_b)
    return torch.cat(ta, 1), torch.cat(tb, 1)


@pytest.mark.parametrize("length", [64, 84])
def test_batched_teacher_equals_the_four_pass_formulation(length):
    model = _tiny().train()
    with torch.no_grad():  # make the teacher differ from the student
        for p in model.student_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = _ids(2, length)
    out = model(ids, mode="pretrain")
    target_a, target_b = _four_pass_targets(model, ids)
    assert not out.target_a.requires_grad
    assert torch.allclose(out.target_a, target_a, atol=1e-5)
    assert torch.allclose(out.target_b, target_b, atol=1e-5)
    # The teacher ignores dropout and the student's train mode: same targets on a second (differently dropped) pass.
    again = model(ids, mode="pretrain")
    assert torch.equal(again.target_a, out.target_a) and not torch.equal(again.fa, out.fa)


# ---------------------------------------------------------------------------------------------- gradients, EMA
def test_gradient_reaches_every_trainable_parameter_and_no_ema_parameter():
    model = _tiny().train()
    model.set_step(50)  # past the tiny preset's gate freeze (10), so gate_fuse and gate supervision are live
    ids = _ids(4, 100)
    mask = torch.rand(4, 100, generator=torch.Generator().manual_seed(0)) < 0.3
    cfg = ObjectiveConfig(sem_warmup_steps=10, gate_sup_warmup_steps=10, gram="fast")
    pretrain_loss(model(ids, mode="pretrain"), ids, mask, 50, cfg).total.backward()
    for name, p in model.named_student_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.ema_parameters())
    ema_ids = {id(p) for p in model.ema_parameters()}
    assert not any(id(p) in ema_ids for p in model.student_parameters())


def test_ema_update_math_and_timing():
    model = _tiny(ema_decay=0.9)
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.ema_parameters()]
    students = [p for name, p in model.named_student_parameters()
                if name.startswith(("branchA_core.", "branchB_core.", "bridge."))]
    model.train()(_ids(2, 40))  # a training forward does not touch the teacher (defect 9 fixed)
    assert all(torch.equal(a, b) for a, b in zip(before, model.ema_parameters()))
    model.update_ema()
    for old, new, student in zip(before, model.ema_parameters(), students, strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * student, atol=1e-6)
    upstream = _tiny(ema_decay=0.9, compat=CompatConfig(ema_update_in_forward=True))
    with torch.no_grad():
        upstream.branchA_core.output_norm.bias.fill_(1.0)
    upstream.train()(_ids(2, 40))
    assert torch.allclose(upstream.branchA_core_ema.output_norm.bias, torch.full((32,), 0.1))


def test_teacher_modules_stay_in_eval_mode():
    model = _tiny().train()
    assert model.bridge.training and not model.bridge_ema.training
    assert not any(m.training for m in model.branchA_core_ema.modules())


# -------------------------------------------------------------------------------------------------- gate freeze
def _half_mix_logits(model: SSScanDNAHybridModel, out: PretrainOutput) -> torch.Tensor:
    mix = 0.5 * out.fa + 0.5 * out.fb
    return model.out_linear(F.layer_norm(mix, mix.shape[-1:]))


def test_gate_freeze_is_a_training_warmup_keyed_to_the_optimizer_step():
    model = _tiny()  # gate_freeze_steps = 10
    ids = _ids(2, 64)
    model.set_step(3)
    assert model.g_step.item() == 3
    out = model.train()(ids, mode="pretrain")
    assert out.gate_logits is None and out.gate_frozen
    assert torch.allclose(out.logits, _half_mix_logits(model, out), atol=1e-6)
    assert model.step == 3 and model.g_step.item() == 3  # forwards do not count steps
    out = model.eval()(ids, mode="pretrain")  # eval: never frozen
    assert out.gate_logits is not None
    assert not torch.allclose(out.logits, _half_mix_logits(model, out), atol=1e-3)
    model.set_step(10)
    assert model.train()(ids, mode="pretrain").gate_logits is not None


def test_upstream_gate_semantics_freeze_in_eval_and_count_forwards():
    model = _tiny(compat=CompatConfig.upstream())
    ids = _ids(2, 64)
    out = model.eval()(ids, mode="pretrain")
    assert out.gate_logits is None
    assert torch.allclose(out.logits, _half_mix_logits(model, out), atol=1e-6)
    model.train()
    for _ in range(3):
        model(ids)
    assert model.step == 3 and model.g_step.item() == 3


# ---------------------------------------------------------------------------------------------- precision, syncs
def test_comba_runs_in_fp32_under_autocast():
    model = _tiny().eval()
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes[name] = output.dtype
        return hook

    model.branchA_core.layers[0].comba.register_forward_hook(record("comba"))
    model.branchA_core.layers[0].transformer.mixer.register_forward_hook(record("attn"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_ids(2, 64))
    assert dtypes == {"comba": torch.float32, "attn": torch.bfloat16}
    assert torch.isfinite(logits).all()


def test_the_training_forward_and_loss_never_read_tensors_on_the_host(monkeypatch):
    """No .item()/int()/bool() on tensors in forward or loss: each would be a device sync on GPU (defects 23-24)."""
    import crossdna.model.hybrid as hybrid

    model = _tiny().train()
    model.set_step(50)
    ids = _ids(2, 100)
    mask = ids > 1
    monkeypatch.setattr(hybrid, "validate_input_ids", lambda *a, **k: None)  # the CPU-only range check

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    terms = pretrain_loss(model(ids, mode="pretrain"), ids, mask, 50, ObjectiveConfig(gram="fast"))
    terms.total.backward()
    monkeypatch.undo()
    assert torch.isfinite(terms.total)


def test_config_roundtrip_and_validation(tmp_path):
    from crossdna import config

    path = tmp_path / "m.yaml"
    path.write_text(config.dump_yaml(CrossDNAConfig.preset("tiny")))
    cfg = CrossDNAConfig.load(path, ["compat.rc_alignment=upstream", "kernels=reference"])
    assert cfg.d_model == 32 and cfg.compat.rc_alignment == "upstream" and cfg.kernels == "reference"
    assert dataclasses.asdict(CrossDNAConfig.load(None)) == dataclasses.asdict(CrossDNAConfig.preset("8m"))
    with pytest.raises(ValueError, match="compat.rc_alignment"):
        CrossDNAConfig.load(path, ["compat.rc_alignment=mirror"])
    with pytest.raises(ValueError, match="alphabet_size"):
        CrossDNAConfig.load(path, ["alphabet_size=7"])
    with pytest.raises(ValueError, match="unknown model preset"):
        CrossDNAConfig.preset("113m")


@pytest.mark.parametrize("changes", [{"use_ema_teacher": False}, {"use_bridge": False}])
def test_ablations_run_end_to_end(changes):
    """Upstream's ablation switches: the student itself as teacher (in eval mode, no dropout), and no TokenBridge."""
    model = _tiny(**changes).train()
    model.set_step(50)
    ids = _ids(2, 100)
    out = model(ids, mode="pretrain")
    terms = pretrain_loss(out, ids, ids > 2, 50, ObjectiveConfig(sem_warmup_steps=1))
    terms.total.backward()
    assert torch.isfinite(terms.total) and terms.sem > 0
    if not changes.get("use_ema_teacher", True):
        assert count_parameters(model)["ema"] == 0 and model.bridge.training  # restored after the teacher pass
        again = model(ids, mode="pretrain")
        assert torch.equal(again.target_a, out.target_a)  # no dropout in the teacher pass
    else:
        assert model.bridge is None and not any("bridge" in k for k in model.state_dict())


def test_hybrid_gate_is_upstreams_and_keeps_no_concatenation():
    """The hybrid core's gate σ(W[m‖t] + b) is computed as W_m·m + W_t·t + b: the same values and gradients as
    through the concatenation (W stays one [d, 2d] weight, upstream's key), and the [B, T, 2d] concatenation is not
    among the tensors kept for the backward (it would duplicate m and t, which the mix keeps)."""
    from crossdna.model.branch import EnhancedHybridCore

    torch.manual_seed(0)
    cfg = CrossDNAConfig.preset("tiny")
    layer = EnhancedHybridCore(cfg, 0)
    x = torch.randn(2, 96, cfg.d_model)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, "reference")
    tokens = x.shape[0] * x.shape[1]
    assert not [s for s in saved if s[-1] == 2 * cfg.d_model and math.prod(s[:-1]) == tokens], saved
    out.square().sum().backward()

    m = layer.comba(x, "reference")
    t = layer.transformer(m, "reference")
    g = torch.sigmoid(F.linear(torch.cat([m, t], dim=-1), layer.gate.weight, layer.gate.bias))
    torch.testing.assert_close(out, layer.out_norm(g * t + (1 - g) * m))
    grad = torch.autograd.grad(layer.out_norm(g * t + (1 - g) * m).square().sum(), layer.gate.weight)[0]
    torch.testing.assert_close(layer.gate.weight.grad, grad)


def test_compiled_model_is_the_eager_model():
    """compile_model (inductor's C++ on the CPU): the layers, bridges, the branches' output norms and the fusion head
    (``_fuse``) compiled give the eager model's pretraining loss and gradients. The fusion head must be the compiled
    wrapper, not the method, and dynamo must have compiled the output norm's frame (it skips an ``nn.LayerNorm``
    compiled as a module, which is how an earlier form of this left it eager)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from crossdna.model.branch import DeepEnhancedBranch
    from tests.requires import tool

    from crossdna.model.compile import compile_model

    tool("g++")  # inductor's CPU code is C++
    torch.manual_seed(0)
    cfg = CrossDNAConfig.preset("tiny").replace(dropout=0.0, bridge_dropout=0.0)
    eager = SSScanDNAHybridModel(cfg).train()
    eager.set_step(cfg.gate_freeze_steps + 1)  # the gate open: gate_fuse, sigmoid and the mix in the graph
    compiled = compile_model(SSScanDNAHybridModel(cfg).train())
    compiled.load_state_dict(eager.state_dict())
    compiled.set_step(cfg.gate_freeze_steps + 1)
    assert hasattr(compiled._fuse, "_torchdynamo_orig_callable")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (2, 256), generator=g)
    mask = torch.rand(2, 256, generator=g) < 0.15
    results = []
    for model in (eager, compiled):
        loss = pretrain_loss(model(ids, mode="pretrain"), ids, mask, 20000, ObjectiveConfig()).total
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.student_parameters()])))
    (eager_loss, eager_grad), (compiled_loss, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0.0)
    assert (compiled_grad - eager_grad).norm() / eager_grad.norm() < 1e-4
    assert _debug_get_cache_entry_list(DeepEnhancedBranch._output_norm.__code__)
