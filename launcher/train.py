"""The pretraining loop. ``python -m launcher.train --config configs/pretrain/<preset>.yaml key.sub=value ...``

The same code runs under plain ``python`` (world 1), ``torchrun`` and ``deepspeed --module launcher.train``.
Per optimizer step the host synchronises exactly once: the step's loss terms, grad norm, sample digest and the
preemption flag travel in one float64 vector through one all-reduce, and one ``.tolist()`` reads it back. That
read gives the finiteness check (before the optimizer touches the weights), the logged values, and an agreed
step boundary for preemption.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from crossdna import ops
from crossdna.config import config_hash, dump_yaml, to_dict
from crossdna.cuda_graphs import GraphedStep
from crossdna.data import EvalStream, PretrainStream
from crossdna.model import SSScanDNAHybridModel
from crossdna.model.compile import compile_model
from crossdna.objectives import loss_weights, pretrain_loss
from launcher.checkpoint import CheckpointManager
from launcher.config import TrainConfig, load_train_config, uses_cuda_graph
from launcher.distributed import DistEnv, derive_seed, init_distributed, seed_everything, shutdown
from launcher.evaluate import evaluate
from launcher.export import export_weights
from launcher.optim import LRSchedule
from launcher.parallelize import build_engine
from launcher.progress import Progress
from launcher.signals import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionFlag
from launcher.stragglers import step_time_spread
from launcher.tracking import Tracker

log = logging.getLogger("launcher")

# Layout of the per-step statistics vector.
TERMS = ("total", "ce", "sem", "gate")
METRICS = ("acc", "acc_a", "acc_b")
LOGGED_NAMES = {"total": "loss"}
_GRAD_NORM, _INDEX_SUM, _INDEX_SQ, _PREEMPT, _SAVED = range(len(TERMS) + len(METRICS), len(TERMS) + len(METRICS) + 5)
_NSTATS = _SAVED + 1


class NonFiniteLoss(RuntimeError):
    pass


def load_weights(model: SSScanDNAHybridModel, path: str) -> None:
    """A consolidated state dict (``crossdna export-weights``/``import-upstream``) into the fresh model."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"trainer.init_weights={path}: cannot read safetensors: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"trainer.init_weights={path}: does not fit model: {str(e).splitlines()[0][:300]}") from e


class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        t = cfg.trainer
        self.run_dir = Path(t.run_dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        # The model is initialised from a seed shared by all ranks (FSDP2 and ZeRO-3 shard each rank's own
        # copy, so the copies must agree); afterwards every rank gets its own stream for dropout.
        torch.manual_seed(derive_seed(t.seed, "init"))
        model = SSScanDNAHybridModel(cfg.model)
        model.overlap_teacher = t.overlap_teacher
        if t.init_weights:
            load_weights(model, t.init_weights)
        # Kernel choice at start-up, not at the first forward: 'fused' that cannot run (e.g. fla #640 on Hopper
        # without tilelang) is refused here, 'auto' falls back to the reference kernels with one warning line.
        ops.resolve(cfg.model.kernels, env.device)
        if t.compile:
            compile_model(model.to(env.device), activation_budget=t.compile_activation_budget)
        seed_everything(t.seed, env.rank, t.deterministic)
        graphed = uses_cuda_graph(cfg, env)
        self.engine = build_engine(model, t.strategy, env, cfg.optim, t.precision, t.micro_batch, t.grad_accum,
                                   t.deepspeed_config, graphed=graphed)
        # Captured: the loss weights are device tensors refilled before each replay, one graph per gate phase.
        self._weights = torch.zeros(2, device=env.device).unbind() if graphed else None
        self._micro_step = GraphedStep(self._forward_backward) if graphed else self._forward_backward
        if graphed and env.is_main:
            log.info("trainer.cuda_graph=%s: forward + backward and the optimizer step replayed as CUDA graphs",
                     t.cuda_graph)
        self.schedule = LRSchedule(cfg.schedule, cfg.optim.lr, t.steps)
        self.stream = PretrainStream(cfg.data.path, cfg.data.train_split, cfg.data, env.rank, env.world_size,
                                     t.micro_batch, t.grad_accum)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", env, keep_last=t.keep_last,
                                      async_save=t.async_checkpoint and self.engine.family == "torch")
        self.config_yaml = dump_yaml(cfg)
        self.step = 0
        self.tokens_seen = 0
        self.tracking_run_id: str | None = None
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------- resume
    def maybe_resume(self) -> None:
        latest = self.ckpt.latest() if self.cfg.trainer.resume else None
        if latest is None:
            return
        state = self.ckpt.load(latest, self.engine)
        self.stream.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.tracking_run_id = state.get("tracking_run_id")
        self.last_checkpoint = latest
        if state["world_size"] != self.env.world_size and self.env.is_main:
            log.info("resuming a %d-rank checkpoint on %d ranks (same global batch, same sample order)",
                     state["world_size"], self.env.world_size)
        if self.env.is_main:
            log.info("resumed from %s at step %d", latest, self.step)

    def save(self) -> Path:
        state = {"strategy": self.cfg.trainer.strategy, "strategy_family": self.engine.family,
                 "loader": self.stream.state_dict(), "tokens_seen": self.tokens_seen,
                 "tracking_run_id": self.tracking_run_id, "config_hash": config_hash(self.cfg),
                 "manifest_hash": self.stream.manifest_hash}
        path = self.ckpt.save(self.step, self.engine, state, self.config_yaml)
        self.last_checkpoint = path
        self.tracker.log_checkpoint(self.step, path, self.stream.manifest_hash)
        return path

    # --------------------------------------------------------------------------------------------------- step
    def _micro_batches(self, batches) -> tuple[torch.Tensor, int, float]:
        """One optimizer step's forwards and backwards: (local statistics vector, sequence length, seconds
        spent waiting for data)."""
        t, env, engine = self.cfg.trainer, self.env, self.engine
        local = torch.zeros(_NSTATS, dtype=torch.float64, device=env.device)
        data_wait = 0.0
        for micro in range(t.grad_accum):
            t0 = time.perf_counter()
            # The DataLoader draws its seed from the global RNG when its iterator starts (lazily, at the first
            # batch, which after a resume is a different step); forking keeps dropout's stream independent of
            # the input pipeline, so a resumed run continues the same stream.
            with torch.random.fork_rng(devices=[]):
                batch = next(batches)
            data_wait += time.perf_counter() - t0
            engine.set_grad_sync(micro == t.grad_accum - 1)
            inputs = {k: batch[k].to(env.device, non_blocking=True) for k in ("input_ids", "labels", "loss_mask")}
            if isinstance(self._micro_step, GraphedStep):
                for weight, value in zip(self._weights, loss_weights(self.step, self.cfg.model.gate_freeze_steps,
                                                                     self.cfg.objective)):
                    weight.fill_(value)
                terms = self._micro_step(inputs, phase=engine.model.gate_frozen())
            else:
                terms = self._micro_step(inputs)
            index = batch["index"].to(env.device, dtype=torch.float64)
            local[:_GRAD_NORM] += terms.double()
            local[_INDEX_SUM] += index.sum()
            local[_INDEX_SQ] += (index * index).sum()
        local[:_GRAD_NORM] /= t.grad_accum
        return local, inputs["input_ids"].shape[1], data_wait

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's forward, losses and backward: the loss terms and metrics as one tensor (TERMS +
        METRICS). What a CUDA graph captures: no host reads, no Python branch on tensor values."""
        out = self.engine.forward(batch["input_ids"])
        terms = pretrain_loss(out, batch["labels"], batch["loss_mask"], self.step, self.cfg.objective, self._weights,
                              compiled=self.cfg.trainer.compile)
        total = self._inject_fault(terms)
        self.engine.backward(total)
        return torch.stack([total.detach(), terms.ce.detach(), terms.sem.detach(), terms.gate.detach(), terms.acc,
                            terms.acc_a, terms.acc_b])

    def _inject_fault(self, terms) -> torch.Tensor:
        f = self.cfg.fault
        if f.nonfinite_step != self.step + 1 or f.nonfinite_rank != self.env.rank:
            return terms.total
        bad = getattr(terms, f.nonfinite_term) * float("nan")
        setattr(terms, f.nonfinite_term, bad)
        return terms.total if f.nonfinite_term == "total" else terms.total + bad

    def _nonfinite(self, local: torch.Tensor, values: list[float]) -> NonFiniteLoss:
        """Rare path (extra collectives allowed): which ranks and which terms went non-finite."""
        gathered = [torch.empty_like(local) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, local)
        culprits = []
        for rank, vec in enumerate(gathered):
            bad = [name for i, name in enumerate(TERMS) if not math.isfinite(vec[i].item())]
            # total is non-finite whenever a component is: name the component when there is one
            named = [b for b in bad if b != "total"] or bad
            if named:
                culprits.append(f"rank {rank}: {', '.join(named)}")
        if not culprits and not math.isfinite(values[_GRAD_NORM]):
            culprits.append("the gradient norm (losses finite)")
        where = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        return NonFiniteLoss(f"non-finite loss at step {self.step + 1}: {'; '.join(culprits)}; the optimizer step "
                             f"was skipped and training stops ({where})")

    # --------------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        cfg, t, env, engine = self.cfg, self.cfg.trainer, self.env, self.engine
        self.maybe_resume()
        self.tracker = Tracker.create(cfg.tracking, self.run_dir, rank=env.rank, world_size=env.world_size,
                                      resume_run_id=self.tracking_run_id, config=to_dict(cfg),
                                      tags={"config_hash": config_hash(cfg), "strategy": t.strategy,
                                            "data.manifest_hash": self.stream.manifest_hash},
                                      local_rank=env.local_rank)
        self.tracking_run_id = self.tracker.run_id
        progress = Progress(self.run_dir, t.steps, self.step, enabled=env.is_main)
        eval_stream = None
        status, code = "FINISHED", 0
        preempt = PreemptionFlag().install()
        batches = iter(self.stream)
        mark = time.perf_counter()  # end of the previous step's bookkeeping: the ETA counts eval and checkpoints
        try:
            engine.train(True)
            # The model holds the number of completed optimizer steps (its gate freeze reads it, and checkpoints and
            # exports carry it), so it is updated right after each step rather than before the next forward.
            engine.set_step(self.step)
            while self.step < t.steps:
                t0 = time.perf_counter()
                local, seq_len, data_wait = self._micro_batches(batches)
                norm = engine.clip_grads()
                if norm is not None:
                    local[_GRAD_NORM] = norm.double()
                local[_PREEMPT] = float(preempt.requested)
                # Whether this rank's background checkpoint write has finished: summed over ranks by the step's one
                # all-reduce, so the checkpoint is published as soon as every rank is done, not at the next save
                # (a job killed in between would otherwise lose it).
                local[_SAVED] = float(self.ckpt.pending_done())
                stats = local.clone()
                dist.all_reduce(stats)
                values = stats.tolist()  # the step's one host sync
                mean = [v / env.world_size for v in values]
                if not all(math.isfinite(mean[i]) for i in (*range(len(TERMS)), _GRAD_NORM)):
                    raise self._nonfinite(local, values)
                lr = self.schedule(self.step)
                engine.optimizer_step(lr)
                if engine.ema_after_step:
                    engine.update_ema()
                self.step += 1
                engine.set_step(self.step)
                step_tokens = self.stream.global_batch * seq_len
                self.tokens_seen += step_tokens

                now = time.perf_counter()
                step_s, cycle_s, mark = now - t0, now - mark, now
                progress.step_time(cycle_s)
                grad_norm = engine.grad_norm() if norm is None else mean[_GRAD_NORM]
                record = {**{f"train/{LOGGED_NAMES.get(k, k)}": mean[i] for i, k in enumerate(TERMS)},
                          **{f"train/{k}": mean[len(TERMS) + i] for i, k in enumerate(METRICS)},
                          "train/lr": lr, "train/grad_norm": grad_norm, "train/index_sum": values[_INDEX_SUM],
                          "train/index_sq_sum": values[_INDEX_SQ], "perf/tokens_per_s": step_tokens / step_s,
                          "perf/tokens_seen": self.tokens_seen, "perf/eta_s": progress.eta(self.step),
                          "perf/data_wait_s": data_wait}
                logged = self.step % t.log_every == 0 or self.step == t.steps
                if logged:  # same on every rank: the spread is a (tiny, sync-free) collective
                    self.tracker.log_metrics(self.step, {**record, **step_time_spread(step_s)})
                progress.update(self.step, record, print_line=logged)

                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    if eval_stream is None:
                        eval_stream = EvalStream(cfg.data.path, cfg.data.eval_split, cfg.data, env.rank,
                                                 env.world_size, t.eval_micro_batch or t.micro_batch)
                    metrics = evaluate(engine, eval_stream, cfg.objective, self.step, t.eval_batches)
                    self.tracker.log_metrics(self.step, metrics)
                    progress.event(self.step, metrics, f"eval step {self.step}: ce {metrics['eval/ce']:.4f} "
                                   f"ppl {metrics['eval/ppl']:.3f} acc {metrics['eval/acc']:.4f}")

                if values[_SAVED] == env.world_size:
                    self.ckpt.wait()  # returns at once when nothing is pending
                preempted = values[_PREEMPT] > 0
                saved = preempted or self.step == t.steps or bool(t.ckpt_every and self.step % t.ckpt_every == 0)
                if saved:
                    self.save()
                if preempted:
                    self.ckpt.wait()
                    progress.event(self.step, {"event": "preempted"},
                                   f"preemption signal: checkpoint {self.last_checkpoint} written; "
                                   f"exiting with {REQUEUE_EXIT_CODE} (requeue)")
                    status, code = "KILLED", REQUEUE_EXIT_CODE
                    break
                if cfg.fault.kill_after_step == self.step:
                    if saved:
                        self.ckpt.wait()  # collective: the checkpoint of this step is published first
                    if env.is_main:
                        os.kill(os.getpid(), signal.SIGKILL)
            self.ckpt.wait()
            if code == 0 and self.tracker.writes and self.last_checkpoint is not None:
                # The run's deliverable next to its metrics: the consolidated weights of the final checkpoint.
                weights = export_weights(self.last_checkpoint, self.run_dir / "model.safetensors")
                self.tracker.log_artifact(weights, "model")
        except NonFiniteLoss as e:
            # The message names the last checkpoint as the one to go back to: an async write of it may still be
            # pending or unpublished (the step's check comes before the publishing). Every rank is here (the
            # check is on all-reduced values), so they can meet in wait's barriers.
            self.ckpt.wait()
            if env.is_main:
                log.error("%s", e)
            status, code = "FAILED", NONFINITE_EXIT_CODE
        except BaseException:
            status = "FAILED"
            raise
        finally:
            preempt.uninstall()
            progress.close()
            self.tracker.close(status)
        if code in (NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE):
            # Planned exits are agreed on all-reduced values, so every rank is here and they can meet once more. A rank
            # that exited first would have torchrun kill the others while rank 0 still closes the run (its status,
            # the tracker's last writes), and its closed sockets can abort a rank whose process group is still up.
            dist.barrier()
        return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description="CrossDNA pretraining")
    parser.add_argument("--config", help="YAML training config (configs/pretrain/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    # `deepspeed` passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # A rank killed by a fatal signal (SIGSEGV, SIGABRT from a C++ std::terminate, ...) prints every thread's Python
    # stack to stderr; torchrun's own report gives only the signal.
    faulthandler.enable()
    return train(args.config, args.overrides)


def train(config_path: str | None, overrides: list[str]) -> int:
    cfg = load_train_config(config_path, overrides)
    env = init_distributed()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank{env.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        return Trainer(cfg, env).run()
    finally:
        shutdown()


def exit_without_finalizing(code: int) -> None:
    """Leave with ``code`` once everything is closed, without running the interpreter's finalization.

    gloo's worker threads free finished collectives, and with them tensors whose Python objects need the GIL to
    be released. One that does so while the interpreter is finalizing cannot take the GIL and aborts the process
    ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489), turning a clean exit into a
    crash. destroy_process_group() does not join those threads while DDP still holds the group, so a rank whose last
    collective came milliseconds before its exit (the non-finite-loss stop: an all-gather naming the culprits, then
    the closing barrier) lost that race about once in twelve runs on a 2-core CPU box. The run, the tracker, the
    checkpoints and the process group are closed by then; logs and streams are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        status = main()
    except ValueError as e:  # bad config / data / checkpoint: one line naming the file and field
        print(f"launcher.train: error: {e}", file=sys.stderr)
        status = 2
    exit_without_finalizing(status)
