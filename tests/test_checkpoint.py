"""CheckpointManager on the tiny model in one process (world 1): atomic ``latest``, keep-last-k, exact round trip
of model + optimizer + EMA + RNG, no arbitrary unpickling, clear errors for corrupt or foreign checkpoints."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.distributed as dist

from crossdna.model import CrossDNAConfig, SSScanDNAHybridModel
from launcher.checkpoint import CheckpointError, CheckpointManager, SafeFileSystemReader
from launcher.distributed import init_distributed
from launcher.optim import OptimConfig
from launcher.parallelize import TorchEngine


@pytest.fixture(scope="module")
def env():
    env = init_distributed()  # world 1: in-process store, no MASTER_ADDR needed
    yield env
    dist.destroy_process_group()


def make_engine(env, seed: int = 0) -> TorchEngine:
    torch.manual_seed(seed)
    model = SSScanDNAHybridModel(CrossDNAConfig.preset("tiny"))
    return TorchEngine(model, "ddp", env, OptimConfig(lr=1e-2), precision="fp32", grad_accum=1)


def train_step(engine: TorchEngine, step: int) -> None:
    engine.set_step(step)
    ids = torch.randint(0, 5, (2, 64))
    out = engine.forward(ids)
    loss = out.logits.float().logsumexp(-1).mean() + out.fa.pow(2).mean()
    engine.backward(loss)
    engine.clip_grads()
    engine.optimizer_step(1e-2)
    engine.update_ema()


def save(manager, engine, step):
    return manager.save(step, engine, {"strategy": "ddp", "strategy_family": "torch", "loader": {"consumed": step}},
                        "model: {}\n")


def snapshot(engine):
    return ({k: v.clone() for k, v in engine.model.state_dict().items()},
            {id_: {k: v.clone() for k, v in s.items()} for id_, s in enumerate(engine.optimizer.state.values())})


def test_latest_pointer_and_keep_last(env, tmp_path):
    engine = make_engine(env)
    manager = CheckpointManager(tmp_path / "ckpt", env, keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        train_step(engine, step - 1)
        save(manager, engine, step)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-00000003"
    assert [p.name for p in manager.checkpoints()] == ["step-00000002", "step-00000003"]
    assert manager.latest().name == "step-00000003"
    files = json.loads((manager.latest() / "files.json").read_text())
    assert "trainer.json" in files and "rng/rank-00000.safetensors" in files and "state/.metadata" in files


def test_round_trip_restores_model_optimizer_ema_and_rng(env, tmp_path):
    engine = make_engine(env)
    for step in range(3):
        train_step(engine, step)
    manager = CheckpointManager(tmp_path / "ckpt", env)
    path = save(manager, engine, 3)
    model_before, optim_before = snapshot(engine)
    rng_before = torch.get_rng_state()
    ema_before = [p.clone() for p in engine.model.ema_parameters()]
    assert not torch.equal(ema_before[0], next(engine.model.branchA_core.parameters()))  # the EMA lags

    fresh = make_engine(env, seed=1)  # different init, empty optimizer
    torch.rand(100)  # move the RNG on
    state = manager.load(path, fresh)
    assert state["step"] == 3 and state["loader"] == {"consumed": 3} and state["world_size"] == 1
    model_after, optim_after = snapshot(fresh)
    assert model_after.keys() == model_before.keys()
    for k in model_before:
        assert torch.equal(model_before[k], model_after[k]), k
    assert len(optim_after) == len(optim_before)
    for i in optim_before:
        for k in optim_before[i]:
            assert torch.equal(optim_before[i][k], optim_after[i][k])
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Both continue identically.
    torch.manual_seed(7)
    train_step(engine, 3)
    torch.manual_seed(7)
    train_step(fresh, 3)
    for (n, a), b in zip(engine.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(a, b), n


def test_crash_debris_is_never_the_latest(env, tmp_path):
    engine = make_engine(env)
    manager = CheckpointManager(tmp_path / "ckpt", env)
    save(manager, engine, 1)
    debris = tmp_path / "ckpt" / "step-00000002.tmp"
    (debris / "state").mkdir(parents=True)  # a save killed half-way
    assert manager.latest().name == "step-00000001"
    assert [p.name for p in manager.checkpoints()] == ["step-00000001"]
    save(manager, engine, 2)  # the same step again replaces the debris
    assert manager.latest().name == "step-00000002" and not debris.exists()


def test_corrupt_shard_is_a_clear_error(env, tmp_path):
    engine = make_engine(env)
    manager = CheckpointManager(tmp_path / "ckpt", env)
    path = save(manager, engine, 1)
    shard = next((path / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: corrupt"):
        manager.load(path, make_engine(env))


def test_missing_or_dangling_pointer_is_a_clear_error(env, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "latest").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointManager(root, env).latest()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_dcp_metadata_refuses_foreign_globals(env, tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refusing to unpickle builtins.print"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


class _ByName:
    """Pickles as ``getattr(target, name)``: how Python 3.11.0-3.11.4 pickle an Enum member."""

    def __init__(self, target, name: str):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def test_enum_members_pickled_by_name_load_and_nothing_else_does():
    import io

    from torch.distributed.checkpoint.planner import LoadItemType

    from launcher.checkpoint import _MetadataUnpickler

    def load(obj):
        return _MetadataUnpickler(io.BytesIO(pickle.dumps(obj, protocol=2))).load()

    assert load([_ByName(LoadItemType, "TENSOR")]) == [LoadItemType.TENSOR]
    with pytest.raises(pickle.UnpicklingError, match="only Enum members"):
        load(_ByName(torch.Size, "__new__"))


def test_deepspeed_weights_only_loads_accept_enum_members_pickled_by_name(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from launcher.zero import weights_only_loads

    for obj, expect in ((_ByName(ZeroStageEnum, "gradients"), ZeroStageEnum.gradients),
                        (_ByName(ZeroStageEnum, "__class__"), None)):
        torch.save({"zero_stage": obj}, tmp_path / "state.pt")
        with weights_only_loads():
            if expect is None:
                with pytest.raises(pickle.UnpicklingError, match="only Enum members"):
                    torch.load(tmp_path / "state.pt", weights_only=False)
            else:
                assert torch.load(tmp_path / "state.pt", weights_only=False) == {"zero_stage": expect}


def test_strategy_family_mismatch_is_refused(env, tmp_path):
    engine = make_engine(env)
    manager = CheckpointManager(tmp_path / "ckpt", env)
    path = manager.save(1, engine, {"strategy": "zero3", "strategy_family": "deepspeed"}, "")
    with pytest.raises(CheckpointError, match="written by a deepspeed strategy"):
        manager.load(path, engine)


def test_export_weights_consolidates_to_a_strict_state_dict(env, tmp_path):
    from safetensors import safe_open

    from crossdna.cli import main as cli
    engine = make_engine(env)
    train_step(engine, 0)
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", env)
    manager.save(1, engine, {"strategy": "ddp", "strategy_family": "torch", "config_hash": "abc",
                             "manifest_hash": "m"}, "model:\n  d_model: 32\n")
    out = tmp_path / "w.safetensors"
    assert cli(["export-weights", str(tmp_path / "run"), str(out)]) == 0  # run dir -> its latest checkpoint
    fresh = SSScanDNAHybridModel(CrossDNAConfig.preset("tiny"))
    from safetensors.torch import load_file
    fresh.load_state_dict(load_file(str(out)), strict=True)
    for (name, a), b in zip(engine.model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "1" and meta["strategy"] == "ddp" and json.loads(meta["model_config"]) == {"d_model": 32}


def test_export_weights_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    from crossdna.cli import main as cli
    assert cli(["export-weights", str(tmp_path / "nope"), str(tmp_path / "w.safetensors")]) == 2
    assert "crossdna export-weights: error:" in capsys.readouterr().err
