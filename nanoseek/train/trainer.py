"""The training loop: one code path for CPU and GPU, fp32/bf16/fp16, with the stability guard.

A step (one data batch per micro-batch, `grad_accum` micro-batches):
  forward under autocast -> backward (GradScaler in fp16) -> one fused host read of the loss
  components and the total grad norm -> StabilityGuard verdict -> only if ok: clip, optimizer
  step, scaler update, MoE balance-bias update, QK-clip, EMA -> metrics -> eval / checkpoint.

Two counters: `step` counts data batches consumed (always advances, so data moves on past a bad
batch) and `opt_step` counts applied updates (drives the LR schedule and MTP ramp, so a skipped
step leaves the schedule exactly where it was).

Under torchrun the same loop runs on every rank (`distributed.py`: DDP or FSDP2): the host read above
becomes one all-reduce of the loss components and grad norm, so every rank's guard judges the global
step and all ranks apply or drop it together; rank 0 logs and writes checkpoints of full state.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import RunConfig
from nanoseek.diagnose import locate_and_save, nonfinite_grads
from nanoseek.data import PreparedData, TokenLoader, count_windows, prepare_data
from nanoseek.model import Transformer
from nanoseek.model.transformer import ModelOutput
from nanoseek.train.clipping import AdaptiveClip, clip_norm
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from nanoseek.train.distributed import Distributed, launched_by_torchrun, local, unwrap
from nanoseek.train.faults import FaultInjector
from nanoseek.train.fp8 import enable_fp8
from nanoseek.train.guard import StabilityGuard, Verdict
from nanoseek.train.loading import model_from_state
from nanoseek.train.metrics import MetricsLogger, Throughput, device_peak_flops, mfu, peak_memory_gb
from nanoseek.train.optim import apply_lr_factor, build_optimizer, lr_factor
from nanoseek.train.plateau import unigram_entropy
from nanoseek.train.rng import rng_state, seed_everything, set_rng_state


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    opt_step: int
    train_loss: float
    val_loss: float | None
    status: str  # finished | early-stopped | aborted | interrupted (Ctrl-C: saved, resumable)
    n_skips: int
    n_rollbacks: int

    @property
    def exit_code(self) -> int:
        return {"aborted": 3, "interrupted": 130}.get(self.status, 0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use --device cpu (or auto)")
    return torch.device(name)


Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], ModelOutput]


def next_token_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
    """The default objective: the model's own next-token (+ MTP, aux, z) loss."""
    return model(x, y)


class Trainer:
    """Builds data, model, optimizer and guard for a RunConfig and runs the loop.

    `model` (a Transformer built elsewhere: a converted or imported model, or one carrying adapters)
    replaces the one built from `cfg.model`; only its parameters with requires_grad train.
    `objective(model, x, y) -> ModelOutput` replaces the next-token loss (distillation against a
    teacher, say); its `losses` dict is logged, and `losses["ce"]` (else the total) is the eval metric.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 model: Transformer | None = None, objective: Objective = next_token_objective):
        # The process group first: it decides this rank's device (cuda:LOCAL_RANK under torchrun).
        self.dist = Distributed.setup(cfg.train.dist, resolve_device(cfg.device))
        created = not Path(run_dir).exists()
        try:
            if resume and created:
                raise ValueError(f"--resume: {run_dir} does not exist; point --out at the run to continue, "
                                 "or start a new run without --resume")
            self._build(cfg, run_dir, resume, show_progress, model, objective)
        except BaseException:  # a bad --data or --out must leave neither the process group nor a half run
            self.dist.close(wait=False)
            if created and self.dist.is_main and latest_checkpoint(run_dir) is None:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    def _build(self, cfg: RunConfig, run_dir: str | Path, resume: bool, show_progress: bool,
               model: Transformer | None, objective: Objective) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.objective = objective
        tc = cfg.train
        self.device = self.dist.device
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals make CPU matmuls crawl late in training
        if tc.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' needs an Ampere or newer GPU; use --train.precision fp16")
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ValueError(f"{self.run_dir} already holds a run with checkpoints; continue it with --resume, "
                             "or choose a new --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)

        with self.dist.main_first():  # rank 0 tokenizes into run_dir/data; the others then read it
            self.data = self._prepare_data()
        if model is not None and model.config.vocab_size < self.data.vocab_size:
            raise ValueError(f"the data's vocabulary ({self.data.vocab_size}) is larger than the model's "
                             f"({model.config.vocab_size}); tokenize with the model's own tokenizer "
                             "(--data.tokenizer path/to/tokenizer.json)")
        cfg.model = model.config if model is not None else dataclasses.replace(
            cfg.model, vocab_size=self.data.vocab_size, derived=dict(cfg.model.derived))
        self.lookahead = 1 + (cfg.model.mtp_depth if cfg.model.mtp_depth else 0)
        self.train_loader = TokenLoader(self.data.train_shards, tc.batch_size, cfg.data.seq_len,
                                        lookahead=self.lookahead, rank=self.dist.rank,
                                        world_size=self.dist.world_size, seed=cfg.seed,
                                        vocab_size=self.data.vocab_size)

        self.built_model = model is None
        self.model = (model if model is not None else Transformer(cfg.model)).to(self.device)
        self.model.activation_checkpointing = tc.activation_checkpointing
        self.model.loss_chunk = tc.loss_chunk
        if tc.fp8:
            enable_fp8(self.model, self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tc.ema_decay > 0 else None
        # DDP wraps; FSDP shards self.model in place, so the optimizer is built after this, on the shards.
        wrapped = self.dist.wrap(self.model, tc.precision)
        self.forward_model = torch.compile(wrapped) if tc.compile else wrapped
        self.optimizer = build_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.guard = StabilityGuard(cfg.guard, tc.precision)
        # After the LR warm-up plus one patience window of steps, a loss at the unigram level is a plateau.
        self.guard.watch_plateau(unigram_entropy(self.data.train_shards, self.data.vocab_size),
                                 start=tc.warmup_steps + cfg.guard.plateau_patience)
        self.clipper = AdaptiveClip(tc.zclip) if tc.zclip > 0 else None
        self.guard.grad_spikes_clipped = self.clipper is not None
        self.faults = FaultInjector(cfg.guard.inject, self.model, self.dist.rank, self.dist.world_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_bad_grads: list[str] = []

        self.step = self.opt_step = 0
        self.saved_step = -1
        self.best_val, self.evals_since_best = math.inf, 0
        self.last_val: float | None = None
        self.snapshots: dict[str, dict | None] = {"good": None, "pending": None}
        resume_note = self._resume() if resume else ""
        if not resume and self.dist.is_main:
            cfg.save_toml(self.run_dir / "config.toml")
        self.logger = MetricsLogger(self.run_dir, tensorboard=tc.tensorboard, wandb=tc.wandb,
                                    wandb_project=tc.wandb_project, config=cfg.to_dict(), total_steps=tc.max_steps,
                                    start_step=self.step, show_progress=show_progress, enabled=self.dist.is_main)
        for note in (self.dist.note, resume_note):
            if note:
                self.logger.write(note)
        self.throughput = Throughput()
        peak = device_peak_flops(self.device, tc.precision)
        self.peak_flops = peak * self.dist.world_size if peak is not None else None  # tokens/s are global
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)

    # ---- setup -------------------------------------------------------------------------------

    def _prepare_data(self) -> PreparedData:
        data_dir = self.run_dir / "data"
        data_cfg = self.cfg.data
        if (data_dir / "meta.json").exists():  # a resumed run reuses its own prepared shards
            data_cfg = dataclasses.replace(data_cfg, source=str(data_dir))
        return prepare_data(data_cfg, data_dir)

    def _resume(self) -> str:
        """Load the latest checkpoint (full state: any mode and world size). Returns a note for the console."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ValueError(f"--resume: no complete checkpoint under {self.run_dir / 'checkpoints'}; "
                             "start without --resume (or point --out at the run to continue)")
        ckpt = read_checkpoint(path)
        _check_fits(ckpt, unwrap(self.model), self.cfg)
        self.dist.load_model_state(self.model, ckpt.model_state)
        state = ckpt.trainer_state
        self.dist.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        for group, fresh in zip(self.optimizer.param_groups, build_optimizer(self.model, self.cfg.train).param_groups):
            group["base_lr"] = fresh["base_lr"]  # an LR given on the command line at resume wins
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"])
        if self.clipper is not None and state.get("clipper") is not None:
            self.clipper.load_state_dict(state["clipper"])
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state)
        self.step, self.opt_step = state["step"], state["opt_step"]
        self.saved_step = self.step
        self.best_val, self.evals_since_best = state["best_val"], state["evals_since_best"]
        self.last_val = state.get("last_val")
        set_rng_state(state["rng"])  # rank 0's; the ranks draw in lock-step, so it is every rank's
        notes = [f"resuming from {path} (step {self.step} of {self.cfg.train.max_steps})"]
        if self.step >= self.cfg.train.max_steps:
            notes.append(f"the run is already at step {self.step} >= max_steps {self.cfg.train.max_steps}: "
                         "nothing to train; pass a larger --max-steps to train it further")
        saved_world, saved_batch = state.get("world_size", 1), state.get("global_batch")
        if saved_world != self.dist.world_size or saved_batch not in (None, self.global_batch):
            was = f"{saved_batch} sequences" if saved_batch is not None else "unknown"
            notes.append(f"resuming a run saved by {saved_world} process(es) on {self.dist.world_size}: the data "
                         f"cursor re-strides over the ranks; global batch {self.global_batch} sequences per step "
                         f"(was {was})")
        return "\n".join(notes)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.dist.world_size

    # ---- state ---------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        """Everything but the weights that exact resume needs (under FSDP a collective: call on every rank)."""
        return {
            "step": self.step, "opt_step": self.opt_step,
            "optimizer": self.dist.full_optimizer_state(self.model, self.optimizer),
            "scaler": self.scaler.state_dict(), "loader": self.train_loader.state_dict(),
            "guard": self.guard.state_dict(), "best_val": self.best_val,
            "clipper": self.clipper.state_dict() if self.clipper is not None else None,
            "evals_since_best": self.evals_since_best, "last_val": self.last_val, "rng": rng_state(),
            "world_size": self.dist.world_size, "global_batch": self.global_batch,
        }

    def save(self, val_loss: float | None = None) -> Path:
        """Write a checkpoint (every rank calls this; rank 0 writes full, unsharded state)."""
        tc = self.cfg.train
        self.saved_step = self.step
        model_state, trainer_state = self.dist.full_model_state(self.model), self.trainer_state()
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, model_state, trainer_state,
                                   self.cfg.to_dict(), val_loss=val_loss,
                                   ema_state=self.ema.state_dict() if self.ema is not None else None,
                                   keep_last=tc.keep_last, keep_best=tc.keep_best)
        self.dist.barrier()  # every rank returns once the checkpoint is complete on disk
        return path if self.dist.is_main else latest_checkpoint(self.run_dir)

    def _snapshot(self) -> dict:
        """An in-memory copy of everything a rollback restores (on CPU, so GPU memory is spared; under FSDP
        each rank keeps its own shards)."""
        return self.dist.offload({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "scaler": self.scaler.state_dict(), "opt_step": self.opt_step, "step": self.step,
                                  "ema": self.ema.state_dict() if self.ema is not None else None})

    def _maybe_snapshot(self) -> None:
        # A snapshot becomes "good" only after it has survived snapshot_every healthy steps, so a
        # bad update that looked fine when applied (an LR spike) is never what we roll back to.
        # With no snapshot yet (a run resumed between snapshot steps), take one now, or a rollback
        # before the next snapshot step would have nothing to restore.
        due = self.step % self.cfg.guard.snapshot_every == 0 or self.snapshots["good"] is None
        if not self.cfg.guard.enabled or not due:
            return
        if self.snapshots["pending"] is not None and self.guard.worth_keeping:  # not weights stuck on the plateau
            self.snapshots["good"] = self.snapshots["pending"]
        self.snapshots["pending"] = self._snapshot()
        if self.snapshots["good"] is None:
            self.snapshots["good"] = self.snapshots["pending"]

    def _rollback(self) -> int:
        """Restore the last good snapshot; the data cursor stays where it is (the bad window is skipped)."""
        snap = self.snapshots["good"]
        self.model.load_state_dict(self.dist.restore(snap["model"]))
        self.optimizer.load_state_dict(self.dist.restore(snap["optimizer"]))
        self.scaler.load_state_dict(snap["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(snap["ema"])
        self.opt_step = snap["opt_step"]
        self.snapshots["pending"] = None
        self.guard.rolled_back()
        return snap["step"]

    # ---- one step ------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> tuple[Verdict, dict[str, float], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Forward/backward over grad_accum micro-batches; judge; apply or drop. Returns the verdict,
        the step's scalar values and the batches (kept for the bad-batch record)."""
        tc, step = self.cfg.train, self.step
        model = self.model
        sample_stats = step % self.cfg.guard.stats_every == 0
        model.set_stat_tracking(sample_stats)
        model.mtp_weight.fill_(self.cfg.model.mtp_weight * min(1.0, (self.opt_step + 1) / max(tc.mtp_rampup_steps, 1)))
        factor = lr_factor(self.opt_step, tc) * self.guard.lr_scale * self.faults.lr_factor(step)
        apply_lr_factor(self.optimizer, factor)

        # Read and check the whole step's data first: every rank must know whether any rank holds a bad
        # batch before the first forward, since DDP/FSDP collectives would otherwise wait forever on a
        # rank that dropped out of the step.
        batches, local_ok = [], True
        for micro in range(tc.grad_accum):
            x, y = self.train_loader.next_batch()
            x = self.faults.batch(step, x, self.data.vocab_size)
            batches.append((x, y))
            if int(x.max()) >= self.data.vocab_size or int(x.min()) < 0:  # checked on the host copy
                local_ok = False  # an out-of-range id would crash the embedding (a device assert on GPU)
                # The step is dropped whole: pass over its other micro-batches too, so the data moves on
                # exactly as after any other skipped step.
                self.train_loader.skip(tc.grad_accum - 1 - micro)
                break
        self.local_batch_ok, self.local_values = local_ok, None
        batch_ok = self.dist.all_ok(local_ok)

        sums, logit_max = {}, None
        for micro, (x, y) in enumerate(batches if batch_ok else []):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.dist.grad_sync(self.forward_model, micro == tc.grad_accum - 1):
                with self._autocast(), self.faults.activations(step):
                    out = self.objective(self.forward_model, x, y)
                loss = self.faults.loss(step, out.loss) / tc.grad_accum
                self.scaler.scale(loss).backward()
            for name, value in out.losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / tc.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + loss.detach().float()
            if sample_stats:
                logit_max = out.logits.detach().abs().max().float() if out.logits is not None else out.logit_max
        self.faults.grads(step, model)

        if batch_ok:
            self.scaler.unscale_(self.optimizer)
            self.dist.sync_scaler(self.scaler, self.optimizer)
            # This rank's part of every gradient: the whole gradient in one process or under DDP, the
            # local shard under FSDP (views, so clipping them in place clips the gradients).
            grads = [local(p.grad) for p in self.params if p.grad is not None]
            local_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            self.local_values = (sums["loss"], local_norm)  # this rank's own, to find a fault's rank
            names = list(sums)
            # Global means and norm (a no-op in one process), so every rank judges the same numbers.
            reduced, grad_norm = self.dist.reduce_step([sums[n] for n in names], local_norm)
            # The one host sync of the step: loss components and grad norm together.
            values = dict(zip(names + ["grad_norm"], torch.stack(reduced + [grad_norm]).tolist()))
            if logit_max is not None:
                values["logit_max"] = float(logit_max)
        else:
            values = {"loss": math.nan, "grad_norm": math.nan}
        verdict = self.guard.check(step, values["loss"], values["grad_norm"], batch_ok, ce=values.get("ce"))

        if verdict.ok:
            limit = clip_norm(tc.grad_clip, self.clipper, values["grad_norm"])  # fixed clip, tightened by ZClip
            if self.clipper is not None:  # only applied steps move its averages: a skip leaves it untouched
                self.clipper.commit(values["grad_norm"])
            if math.isfinite(limit):  # clip_grads_with_norm_'s arithmetic, on the local parts
                coef = torch.clamp(limit / (grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef.to(grads[0].device))
            if tc.grad_noise > 0:  # Neelakantan et al. 2015, sigma^2 = eta / (1 + t)^0.55
                sigma = math.sqrt(tc.grad_noise / (1 + self.opt_step) ** 0.55)
                for g in grads:  # ranks draw in lock-step, so DDP replicas add the same noise
                    g.add_(torch.randn_like(g), alpha=sigma)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            several = self.dist.world_size > 1  # one process: no collective, and no gather of loads for one
            model.update_balance_bias(self.dist.sum_ if several else None)  # loads of the whole global batch
            model.apply_qk_clip(self.dist.max_ if several else None)
            if self.ema is not None:
                self._update_ema()
            self.opt_step += 1
        else:
            if verdict.action == "overflow":
                self.scaler.update()  # lowers the scale; the step itself is dropped
            else:  # fp16: end the scaler's step (its unscale_ record) at the same scale, as if it never ran
                self.scaler.update(self.scaler.get_scale())
            self.last_bad_grads = nonfinite_grads(self.model) if verdict.cause.startswith("non-finite") else []
            model.reset_expert_loads()
        self.optimizer.zero_grad(set_to_none=True)
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        return verdict, values, batches

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.train.ema_decay
        for ema_t, t in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
            if ema_t.dtype.is_floating_point:
                ema_t.lerp_(t, 1 - decay)
            else:
                ema_t.copy_(t)

    # ---- eval ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, model: Transformer | None = None) -> dict[str, float]:
        """Mean loss components over the first eval_batches validation batches (always the same ones)."""
        model = model or self.model
        world = self.dist.world_size
        windows = count_windows(self.data.val_shards, self.cfg.data.seq_len, self.lookahead)
        # Ranks split the same global validation batches one process of batch_size * world_size would see.
        loader = TokenLoader(self.data.val_shards, max(min(self.cfg.train.batch_size, windows // world), 1),
                             self.cfg.data.seq_len, lookahead=self.lookahead, rank=self.dist.rank, world_size=world,
                             vocab_size=self.data.vocab_size, shuffle=False)
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        n = min(self.cfg.train.eval_batches, max(loader.batches_per_epoch, 1))
        for _ in range(n):
            x, y = loader.next_batch()
            with self._autocast():
                out = self.objective(model, x.to(self.device), y.to(self.device))
            for name, value in {"loss": out.loss, **out.losses}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().double() / n
        model.train(was_training)
        names = list(sums)
        if not names:
            return {}
        means = self.dist.mean_(torch.stack([sums[k] for k in names]))  # over ranks; a no-op in one process
        return dict(zip(names, means.tolist()))

    # ---- the loop ------------------------------------------------------------------------------

    def _log_event(self, verdict: Verdict, module: str | None = None, **extra) -> None:
        record = {"kind": "event", "event": verdict.action, "step": self.step - 1, "cause": verdict.cause,
                  "module": module, "action": verdict.action, "value": verdict.value, **extra}
        where = f" in {module}" if module else ""
        line = f"[guard] step {self.step - 1}: {verdict.cause}{where} -> {verdict.action}"
        if extra.get("detail"):
            line += f" ({extra['detail']})"
        self.logger.event(record, line)

    def _on_fault(self, verdict: Verdict, batches) -> str | None:
        """Record the batch and (first time a value goes non-finite) locate the module. Returns it."""
        if verdict.action == "overflow" or not self.cfg.guard.save_bad_batches:
            return None
        if not self.dist.active:
            return locate_and_save(self, verdict, batches)
        return self._on_fault_distributed(verdict, batches)

    def _on_fault_distributed(self, verdict: Verdict, batches) -> str | None:
        """The bad-batch record of a multi-process run: rank 0 writes the batch of the rank where the fault
        began (its own batch was bad, else its own loss, else its own gradients were non-finite), replayed
        with that rank's fault injections on an unsharded copy of the weights. A collective: every rank
        calls it, as every rank holds the same verdict."""
        if self.dist.mode == "fsdp" and not self.built_model:  # no way to rebuild an unsharded copy of it
            self.logger.write(f"[guard] step {self.step - 1}: no bad-batch record (FSDP with a model passed to the "
                              "Trainer cannot be replayed on one rank; use --dist ddp to keep records)")
            return None
        loss, grad_norm = self.local_values or (0.0, 0.0)  # None: no forward ran (a bad batch somewhere)
        mine = {"batch_ok": self.local_batch_ok, "loss_ok": math.isfinite(float(loss)),
                "grad_ok": math.isfinite(float(grad_norm)), "bad_grads": self.last_bad_grads,
                "batches": [(x.cpu(), y.cpu()) for x, y in batches]}
        everyone = self.dist.gather_objects(mine)
        nonfinite = verdict.cause.startswith("non-finite")
        state = self.dist.full_model_state(self.model) if nonfinite and self.dist.mode == "fsdp" else None
        if not self.dist.is_main:
            return None
        culprit = next((r for key in ("batch_ok", "loss_ok", "grad_ok") for r, info in enumerate(everyone)
                        if not info[key]), 0)
        self.last_bad_grads = sorted({name for info in everyone for name in info["bad_grads"]})
        model = self.model
        if state is not None:  # the sharded module cannot run alone on rank 0: replay a whole copy
            model = self._whole_copy(state)
        faults = FaultInjector(self.cfg.guard.inject, model, culprit, self.dist.world_size)
        module = locate_and_save(self, verdict, everyone[culprit]["batches"], model=model, faults=faults)
        self.logger.write(f"[guard] step {self.step - 1}: the fault began on rank {culprit}")
        return module

    def train(self) -> TrainResult:
        try:
            with _GracefulStop(enabled=self.dist.world_size == 1) as stop:
                self.stop = stop
                return self._train()
        except BaseException:  # Ctrl-C or an error mid-run: leave the process group (a no-op in one process)
            self.dist.close(wait=False)
            raise

    def _train(self) -> TrainResult:
        tc = self.cfg.train
        self.model.train()
        status, last_values = "finished", {"loss": math.nan}
        tokens_per_step = tc.batch_size * tc.grad_accum * self.cfg.data.seq_len * self.dist.world_size  # global
        self._maybe_snapshot()
        while self.step < tc.max_steps:
            verdict, values, batches = self.train_step()
            self.throughput.add(tokens_per_step)
            if not verdict.ok:
                module = self._on_fault(verdict, batches)
                if verdict.action == "rollback":
                    to_step = self._rollback()
                    self._log_event(verdict, module, detail=f"restored step {to_step}, lr x{self.guard.lr_scale:g}",
                                    restored_step=to_step, lr_scale=self.guard.lr_scale)
                elif verdict.action == "abort":
                    self._log_event(verdict, module)
                    status = "aborted"
                    self._rollback_for_abort()
                    break
                else:
                    self._log_event(verdict, module)
            else:
                last_values = values
                self._maybe_snapshot()
            self._log_step(values, verdict)
            if verdict.action == "rollback" and self.cfg.guard.rollback_skip_batches:
                # Only now, so the event and the record above name the step that faulted. A "batch" here
                # is a step's data: grad_accum loader batches, so steps and data stay in line.
                self.train_loader.skip(self.cfg.guard.rollback_skip_batches * tc.grad_accum)
                self.step += self.cfg.guard.rollback_skip_batches
            if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                if self._eval_and_maybe_stop():
                    status = "early-stopped"
                    break
            elif self.step % tc.save_every == 0:
                self.save(None)
            if self.stop.requested:
                status = "interrupted"
                break
        if self.saved_step != self.step:
            self.save(self.last_val)
        result = TrainResult(self.run_dir, self.step, self.opt_step, last_values.get("ce", math.nan), self.last_val,
                             status, self.guard.n_skips, self.guard.n_rollbacks)
        self.logger.log({"kind": "summary", "step": self.step, "status": status, "loss": result.train_loss,
                         "val_loss": self.last_val, "skips": self.guard.n_skips, "rollbacks": self.guard.n_rollbacks})
        self.logger.close()
        self._leave_process_group()
        return result

    def _leave_process_group(self) -> None:
        """After the last step, make this trainer a one-process trainer over an ordinary module: under FSDP
        the final weights are gathered into a plain Transformer (so a sample or an evaluation needs no other
        rank; a model passed in stays sharded), then the process group is left if this run started it."""
        if self.dist.mode == "fsdp" and self.built_model:
            self.model = self._whole_copy(self.dist.full_model_state(self.model, everywhere=True))
            self.forward_model = self.model
        self.dist.close()
        self.dist = self.dist.detached()

    def _whole_copy(self, state: dict[str, torch.Tensor]) -> Transformer:
        """An unsharded model on this rank's device holding the full `state` (NPT blocks included). Its
        init runs under a forked RNG, so this rank's random stream stays in step with the others'."""
        with torch.random.fork_rng(devices=[]):
            return model_from_state(self.cfg.model, state).to(self.device)

    def _rollback_for_abort(self) -> None:
        if self.snapshots["good"] is not None:  # the final checkpoint holds the last good weights
            snap = self.snapshots["good"]
            self.model.load_state_dict(self.dist.restore(snap["model"]))
            self.optimizer.load_state_dict(self.dist.restore(snap["optimizer"]))
            self.opt_step = snap["opt_step"]

    def _log_step(self, values: dict[str, float], verdict: Verdict) -> None:
        if not self.dist.is_main:  # only rank 0 logs: no host reads for a record nobody writes
            return
        record = {"kind": "train", "step": self.step - 1, "opt_step": self.opt_step, "action": verdict.action,
                  "skipped_steps": self.guard.n_skips, **values}
        if (self.step - 1) % self.cfg.guard.stats_every == 0:
            record.update(self._health_stats())
        if self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.max_steps:
            tps = self.throughput.rate()
            record["tokens_per_sec"] = tps
            record["mfu"] = mfu(self.flops_per_token, tps, self.peak_flops)
            record["peak_mem_gb"] = peak_memory_gb(self.device)
        self.logger.log(record)
        shown = {"ce": values["ce"]} if "ce" in values else {"loss": values.get("loss")}  # as the val loss reads
        self.logger.progress(self.step - 1, **shown, tok_s=record.get("tokens_per_sec"))

    @torch.no_grad()
    def _health_stats(self) -> dict[str, float]:
        """Sampled model statistics for the log, read to the host in one transfer."""
        stats: dict[str, torch.Tensor] = {}
        if self.cfg.model.swiglu_clamp > 0:  # the opt-in clamp is never silent: values clamped so far
            stats["swiglu_clamped"] = sum(b for n, b in self.model.named_buffers() if n.endswith("clamped"))
        for name, attn in self.model.attention_layers():
            if attn.track_max_logit:
                stats[f"attn_logit_max/{name}"] = attn.max_logit.max()
        for name, moe in self.model.moe_layers():
            load = moe.gate.last_load
            # max/mean of the expert loads; NaN before any token was counted (the entry is then left out)
            stats[f"expert_load_imbalance/{name}"] = torch.where(load.sum() > 0, load.max() / load.mean(),
                                                                 torch.full_like(load.mean(), math.nan))
            stats[f"router_logit_max/{name}"] = moe.gate.logit_stats[0]
            stats[f"router_z/{name}"] = moe.gate.logit_stats[1]
        if not stats:
            return {}
        values = torch.stack([v.float().to(self.device) for v in stats.values()]).tolist()
        return {k: v for k, v in zip(stats, values) if not (k.startswith("expert_load_imbalance/") and math.isnan(v))}

    def _eval_and_maybe_stop(self) -> bool:
        tc = self.cfg.train
        losses = self.evaluate()
        val = losses.get("ce", losses["loss"])
        record = {"kind": "eval", "step": self.step, **{f"val_{k}": v for k, v in losses.items()}, "val_loss": val}
        if self.ema is not None:
            ema_losses = self.evaluate(self.ema)
            record["val_loss_ema"] = ema_losses.get("ce", ema_losses["loss"])
        self.logger.log(record)
        self.logger.write(f"step {self.step}: val loss {val:.4f}" +
                          (f" (ema {record['val_loss_ema']:.4f})" if self.ema is not None else ""))
        self.last_val = val
        if val < self.best_val:
            self.best_val, self.evals_since_best = val, 0
        else:
            self.evals_since_best += 1
        self.save(val)
        return bool(tc.early_stop_patience) and self.evals_since_best >= tc.early_stop_patience


def _check_fits(ckpt, model: torch.nn.Module, cfg: RunConfig) -> None:
    """Refuse, in one line, a checkpoint whose tensors do not fit the model (a changed --preset or --model.*)."""
    own = model.state_dict()
    misfits = sorted(set(own) ^ set(ckpt.model_state)) + sorted(
        name for name, tensor in ckpt.model_state.items() if name in own and own[name].shape != tensor.shape)
    if not misfits:
        return
    saved = ckpt.config.get("model", {})
    now = cfg.model.to_dict()
    changed = [f"model.{key}={now[key]!r} (saved: {saved[key]!r})" for key in now
               if key in saved and key != "derived" and saved[key] != now[key]]
    what = ", ".join(changed[:4]) or f"{len(misfits)} tensors differ, first {misfits[0]}"
    raise ValueError(f"--resume: the checkpoint in {ckpt.path} does not fit this model ({what}); drop the model "
                     "flags (--preset, --model.*) to continue the run, or start a new run with another --out")


class _GracefulStop:
    """Ctrl-C while training: the first finishes the current step, saves a checkpoint and stops (resumable);
    a second interrupts at once. Only in a single process's main thread: under torchrun the ranks would
    stop at different steps, so the signal keeps its default meaning there."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def __enter__(self) -> "_GracefulStop":
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nnanoseek: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
              flush=True)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def default_run_dir(preset: str) -> Path:
    if launched_by_torchrun()[2] > 1:  # each rank would read its own clock and pick its own directory
        raise ValueError("under torchrun pass --out RUN_DIR: every rank must write to the same run directory")
    return Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
