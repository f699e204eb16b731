"""Learning-rate schedules (ours and the upstream timm quirk, spec §5) and AdamW parameter groups."""
from __future__ import annotations

import math

import pytest

from launcher.optim import (OptimConfig, ScheduleConfig, LRSchedule, build_optimizer, param_groups,
                            upstream_timm_lr)


def test_cosine_warms_up_then_decays_to_the_floor():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, warmup_init_lr=1e-6, min_lr=1e-5)
    lr = LRSchedule(cfg, peak_lr=1e-3, total_steps=110)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 50 / 99)))
    assert lr(109) == pytest.approx(1e-5)  # the last step runs at the floor
    decay = [lr(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_upstream_schedule_is_a_warmup_then_constant_lr_min():
    """Spec §5: warmup_t = 3906.6 steps from 1e-6 to 1e-4, then t // 60 >= 1 = cycle_limit, so lr_min forever."""
    cfg = ScheduleConfig(kind="upstream", warmup_init_lr=1e-6, min_lr=1e-5, upstream_t_initial=60,
                         upstream_warmup_t=3906.6)
    lr = LRSchedule(cfg, peak_lr=1e-4, total_steps=13_620)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(1000) == pytest.approx(1e-6 + 1000 * (1e-4 - 1e-6) / 3906.6)
    assert lr(3906) == pytest.approx(1e-6 + 3906 * (1e-4 - 1e-6) / 3906.6)
    assert lr(3906) > 9.9e-5
    for t in (3907, 5000, 9_000, 13_619):
        assert lr(t) == 1e-5
    # Share of training at lr_min (spec: "about 71%").
    assert sum(lr(t) == 1e-5 for t in range(13_620)) / 13_620 == pytest.approx(0.713, abs=0.002)


def test_upstream_formula_has_timms_cosine_when_warmup_is_short():
    # warmup_t < t_initial: the first cycle's cosine is visible between them (timm, warmup_prefix=False).
    kw = dict(base_lr=1e-3, t_initial=60, warmup_t=5, warmup_lr_init=0.0, lr_min=1e-5)
    assert upstream_timm_lr(30, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert upstream_timm_lr(59, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 59 / 60)))
    assert upstream_timm_lr(60, **kw) == 1e-5


def test_schedule_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        ScheduleConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0.0)


@pytest.fixture(scope="module")
def tiny_model():
    from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
    return SSScanDNAHybridModel(CrossDNAConfig.preset("tiny"))


def test_param_groups_split_decay_and_skip_the_teacher(tiny_model):
    groups = param_groups(tiny_model.named_parameters(), OptimConfig(weight_decay=0.1))
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = decay["param_names"] + no_decay["param_names"]
    assert not any("_ema." in n for n in names)  # spec defect 30
    assert sorted(names) == sorted(n for n, _ in tiny_model.named_student_parameters())
    for suffix in ("comba.A_log", "comba.D", "comba.dt_bias", "out_norm.bias", "gate.bias", "o_norm.weight"):
        assert any(n.endswith(suffix) for n in no_decay["param_names"]), suffix
        assert not any(n.endswith(suffix) for n in decay["param_names"]), suffix
    assert "linear.weight" in decay["param_names"] and "gate_fuse.weight" in decay["param_names"]


def test_upstream_optimizer_decays_everything(tiny_model):
    groups = param_groups(tiny_model.named_parameters(), OptimConfig(no_decay_groups=False))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    opt = build_optimizer(tiny_model.named_parameters(), OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_model.student_parameters()))
