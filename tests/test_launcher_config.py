"""TrainConfig loading (presets, overrides, errors naming the field), the generated DeepSpeed config and its
user override, preemption signal handling, per-rank seeds and world-1 process groups."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from crossdna.config import ConfigError, to_dict
from crossdna.model import CrossDNAConfig
from launcher import deepspeed_config
from launcher.config import load_train_config, uses_cuda_graph
from launcher.distributed import DistEnv, derive_seed
from launcher.signals import PreemptionFlag
from tests.conftest import REPO

TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
PRESETS = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_train_config(path, ["data.path=/shards"])
    assert cfg.data.path == "/shards"


def test_model_preset_expands_and_overrides_apply():
    cfg = load_train_config(TINY, ["data.path=/x", "model.dropout=0.0", "trainer.strategy=zero3", "optim.lr=1e-4"])
    expected = to_dict(CrossDNAConfig.preset("tiny"))
    expected["dropout"] = 0.0
    assert to_dict(cfg.model) == expected
    assert cfg.trainer.strategy == "zero3" and cfg.optim.lr == 1e-4


@pytest.mark.parametrize("override, message", [
    (["trainer.strategy=zero4"], "trainer.strategy"),
    (["trainer.stepz=3"], "unknown field(s) ['stepz']"),
    (["model.preset=huge"], "model.preset"),
    (["trainer.micro_batch=0"], "micro_batch"),
    (["trainer.strategy=zero3", "trainer.compile=true"], "trainer: compile: supported with strategy ddp or fsdp"),
    (["trainer.cuda_graph=sometimes"], "trainer.cuda_graph"),
    (["trainer.strategy=fsdp", "trainer.cuda_graph=on"], "trainer: cuda_graph: 'on' is supported with strategy ddp"),
    (["trainer.cuda_graph=on", "fault.nonfinite_step=3"], "trainer.cuda_graph: 'on' cannot inject fault"),
    (["trainer.cuda_graph=on", "model.compat.gate_step=forward_count"], "model.compat.gate_step=optimizer"),
    ([], "data.path"),
])
def test_bad_configs_name_the_file_and_field(override, message):
    overrides = override if not override or "data.path" in override[0] else ["data.path=/x", *override]
    with pytest.raises(ConfigError) as e:
        load_train_config(TINY, overrides)
    assert str(TINY) in str(e.value) and message in str(e.value)


def test_cuda_graph_auto_is_off_without_cuda_and_on_is_refused():
    cpu = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    assert not uses_cuda_graph(load_train_config(TINY, ["data.path=/x"]), cpu)
    with pytest.raises(ValueError, match="trainer.cuda_graph: 'on' needs a CUDA device, this rank runs on cpu"):
        uses_cuda_graph(load_train_config(TINY, ["data.path=/x", "trainer.cuda_graph=on"]), cpu)
    gpu = DistEnv(0, 2, 0, 2, torch.device("cuda", 0), "nccl")
    assert not uses_cuda_graph(load_train_config(TINY, ["data.path=/x"]), gpu)  # auto: one process only
    assert uses_cuda_graph(load_train_config(TINY, ["data.path=/x", "trainer.cuda_graph=on"]), gpu)


def generated(stage=3, **kw):
    return deepspeed_config.generate(stage=stage, micro_batch=4, grad_accum=2, world_size=8, bf16=True,
                                     grad_clip=1.0, **kw)


def test_generated_deepspeed_config():
    cfg = generated()
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 1.0
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert "stage3_param_persistence_threshold" not in generated(stage=1)["zero_optimization"]


def test_user_deepspeed_json_merges_but_cannot_contradict(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7, "stage": 3},
                                "train_micro_batch_size_per_gpu": 4}))
    cfg = deepspeed_config.resolve(generated(), user)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5e7 and cfg["zero_optimization"]["stage"] == 3
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=16 contradicts trainer.micro_batch"):
        deepspeed_config.resolve(generated(), user)
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match=r"zero_optimization.stage=2 contradicts trainer.strategy"):
        deepspeed_config.resolve(generated(), user)
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="'optimizer'/'scheduler' sections are not supported"):
        deepspeed_config.resolve(generated(), user)
    user.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"ds.json:2: invalid JSON"):
        deepspeed_config.resolve(generated(), user)


def test_preemption_flag_catches_usr1_and_term_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with PreemptionFlag() as flag:
            assert not flag.requested
            os.kill(os.getpid(), sig)
            assert flag.requested and flag.signum == sig
    assert signal.getsignal(signal.SIGUSR1) is before


def test_seeds_differ_per_rank_and_are_reproducible():
    seeds = {derive_seed(2222, "rank", r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(2222, "rank", 3) == derive_seed(2222, "rank", 3) != derive_seed(2223, "rank", 3)
