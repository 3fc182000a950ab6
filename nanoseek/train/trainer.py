"""The training loop: one code path for CPU and GPU, fp32/bf16/fp16, one process or torchrun (DDP or FSDP2).

One step (`train_step`) is a pipeline of plain calls:

    read_batches()       grad_accum micro-batches; token ids checked on the host before any forward
    forward_backward()   autocast forward -> loss components -> backward -> one host read: StepStats
    guard.check(stats)   the Verdict, before anything is updated (train/guard.py)
    recorder.record()    on a fault: save the batch, replay it to name the module (train/locate.py)
    apply(verdict)       ok: clip, optimizer, scaler, model.after_optimizer_step, EMA; else drop it whole

The loop (`_train`) then reacts to the verdict (roll back via train/rollback.py, or abort), logs, and at the
step boundary evaluates, saves and honours a stop request. `step` counts data batches consumed (always
advances, so data moves on past a bad batch); `opt_step` counts applied updates (it drives the LR schedule
and MTP ramp, so a skip leaves them be). Every rank judges the same all-reduced numbers, so all apply or
drop a step together; rank 0 logs and saves."""

import contextlib
import copy
import dataclasses
import functools
import math
import shutil
from pathlib import Path

import torch

from nanoseek.config import ModelConfig, RunConfig
from nanoseek.data import TokenLoader, prepare_data
from nanoseek.model import Transformer
from nanoseek.rundir import is_new, unique_run_dir
from nanoseek.train import resume as resuming
from nanoseek.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
from nanoseek.train.clipping import AdaptiveClip, clip_applied_step
from nanoseek.train.distributed import Distributed, launched_by_torchrun, local
from nanoseek.train.evaluation import validation_losses
from nanoseek.train.faults import FaultInjector
from nanoseek.train.fp8 import enable_fp8
from nanoseek.train.guard import RankView, StabilityGuard, StepStats, Verdict
from nanoseek.train.hardware import resolve_device
from nanoseek.train.loading import model_from_state
from nanoseek.train.locate import BadStepRecorder
from nanoseek.train.objectives import Objective, next_token_objective
from nanoseek.train.optim import apply_lr_factor, build_optimizer, lr_factor, update_ema
from nanoseek.train.plateau import unigram_entropy
from nanoseek.train.rng import rng_state, seed_everything
from nanoseek.train.rollback import RollbackKeeper
from nanoseek.train.safety import refuse_nonfinite_weights
from nanoseek.train.state import Progress, restore_run, resume_note
from nanoseek.train.steplog import StepLog
from nanoseek.train.stop import GracefulStop

Batch = tuple[torch.Tensor, torch.Tensor]  # x [B, T], y [B, T + lookahead - 1] (token ids, on the host)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    opt_step: int
    train_loss: float
    val_loss: float | None
    status: str  # finished | early-stopped | aborted | interrupted (Ctrl-C, SIGTERM, SIGUSR1: saved, resumable)
    n_skips: int
    n_rollbacks: int
    stop_signal: int | None = None  # what stopped an interrupted run: SIGINT, SIGTERM or SIGUSR1

    @property
    def exit_code(self) -> int:
        if self.status == "interrupted":
            return 128 + (self.stop_signal or 2)  # the shell's code for a process ended by that signal
        return {"aborted": 3}.get(self.status, 0)


class Trainer:
    """Builds data, model, optimizer and guard for a RunConfig and runs the loop.

    `model` (converted, imported, or carrying adapters) replaces the one built from `cfg.model`; only its
    parameters with requires_grad train. `objective(model, x, y) -> ModelOutput` replaces the next-token loss
    (distillation, say). `resume_from` (step-N, N or a checkpoint directory) resumes an earlier checkpoint."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, show_progress: bool = True,
                 model: Transformer | None = None, objective: Objective = next_token_objective,
                 resume_from: str | None = None):
        # The process group first: it decides this rank's device (cuda:LOCAL_RANK under torchrun).
        self.dist = Distributed.setup(cfg.train.dist, resolve_device(cfg.device))
        created = is_new(run_dir)  # absent, or only locked by this command so far
        try:
            resuming.check_run_dir(Path(run_dir), cfg, resume)  # before anything is written (train/resume.py)
            self._build(cfg, Path(run_dir), model, objective)
            self._open_log(show_progress, self._resume(resume_from) if resume else "")
        except BaseException:  # a bad --data or --out must leave neither the process group nor a half run
            self.dist.close(wait=False)
            if created and self.dist.is_main and latest_checkpoint(run_dir) is None:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise

    # ---- setup -------------------------------------------------------------------------------

    def _build(self, cfg: RunConfig, run_dir: Path, model: Transformer | None, objective: Objective) -> None:
        self.cfg, self.run_dir, tc = cfg, run_dir, cfg.train
        self.device = self.dist.device
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals make CPU matmuls crawl late in training
        if tc.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' needs an Ampere or newer GPU; use --train.precision fp16")
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        with self.dist.main_first():  # rank 0 tokenizes into run_dir/data; the others then read it
            data_cfg = cfg.data
            if (run_dir / "data" / "meta.json").exists():  # a resumed run reuses its own prepared shards
                data_cfg = dataclasses.replace(data_cfg, source=str(run_dir / "data"))
            self.data = prepare_data(data_cfg, run_dir / "data")
        if model is not None and model.config.vocab_size < self.data.vocab_size:
            raise ValueError(f"the data's vocabulary ({self.data.vocab_size}) is larger than the model's "
                             f"({model.config.vocab_size}); tokenize with the model's own tokenizer "
                             "(--data.tokenizer path/to/tokenizer.json)")
        cfg.model = model.config if model is not None else dataclasses.replace(
            cfg.model, vocab_size=self.data.vocab_size, derived=dict(cfg.model.derived))
        self.lookahead = 1 + (cfg.model.mtp_depth or 0)
        self.train_loader = TokenLoader(self.data.train_shards, tc.batch_size, cfg.data.seq_len, self.lookahead,
                                        rank=self.dist.rank, world_size=self.dist.world_size, seed=cfg.seed,
                                        vocab_size=self.data.vocab_size)
        self.built_model = model is None
        self._build_model(model if model is not None else Transformer(cfg.model))
        self.progress, self.saved_step = Progress(), -1
        self.objective = self.train_objective = objective
        self.schedule = functools.partial(lr_factor, cfg=tc)
        if cfg.guard.inject:  # --inject: each fault wraps the part of the step it breaks (train/faults.py)
            faults = FaultInjector(cfg.guard.inject, self.model, self.dist.rank, self.dist.world_size)
            self.train_loader = faults.wrap_loader(self.train_loader, self.progress, self.data.vocab_size)
            self.train_objective = faults.wrap_objective(objective, self.progress)
            self.schedule = faults.wrap_schedule(self.schedule, self.progress)
            self.scaler = faults.wrap_scaler(self.scaler, self.progress, self.model)
        self.clipper = AdaptiveClip(tc.zclip) if tc.zclip > 0 else None  # ZClip (train/clipping.py)
        self.guard = StabilityGuard(cfg.guard, tc.precision, grad_spikes_clipped=self.clipper is not None,
                                    attention_groups=("muon",) if tc.optimizer == "muon" else ())
        # After the LR warm-up plus one patience window, a loss at the unigram level is a plateau. Another
        # objective's loss (a distillation's KL) has no unigram level: only its divergence is watched.
        unigram = (functools.partial(unigram_entropy, self.data.train_shards, self.data.vocab_size)
                   if objective is next_token_objective else None)
        self.guard.watch_plateau(unigram, start=tc.warmup_steps + cfg.guard.plateau_patience)
        self.rollback = RollbackKeeper(cfg.guard, self.model, self.optimizer, self.scaler, self.ema, self.clipper)

    def _build_model(self, model: Transformer) -> None:
        tc = self.cfg.train
        self.model = model.to(self.device)
        self.model.set_training_options(tc.loss_chunk, tc.activation_checkpointing, tc.mtp_rampup_steps)
        if tc.fp8:
            enable_fp8(self.model, self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if tc.ema_decay > 0 else None
        # DDP wraps; FSDP shards self.model in place, so the optimizer is built after this, on the shards.
        wrapped = self.dist.wrap(self.model, tc.precision)
        self.forward_model = torch.compile(wrapped) if tc.compile else wrapped
        self.optimizer = build_optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        # Plain functions, not bound methods: the bad-step recorder holds them, and a trainer in a reference
        # cycle would keep its files open after a failure until the garbage collector ran.
        self._autocast = (contextlib.nullcontext if dtype is None
                          else functools.partial(torch.autocast, self.device.type, dtype=dtype))
        self._whole_copy = functools.partial(whole_copy, self.cfg.model, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _open_log(self, show_progress: bool, resume_note: str) -> None:
        if not resume_note and self.dist.is_main:
            self.cfg.save_toml(self.run_dir / "config.toml")
        self.log = StepLog(self.cfg, self.run_dir, self.model, self.device, self.dist.world_size,
                           self.dist.is_main, self.step, show_progress)
        self.logger = self.log.logger
        for note in filter(None, (self.dist.note, resume_note)):
            self.logger.write(note)
        self.recorder = BadStepRecorder(self.run_dir, self.dist, self.model, self.cfg.guard.inject, self._autocast,
                                        self._whole_copy if self.built_model else None,
                                        self.logger.write) if self.cfg.guard.save_bad_batches else None

    def _resume(self, resume_from: str | None) -> str:
        """Load the latest checkpoint, or `resume_from`, after refusing settings that cannot continue it
        (train/resume.py); any mode and world size. Returns a note for the console."""
        path = resuming.find_checkpoint(self.run_dir, resume_from)
        if path is None:  # stopped before its first checkpoint: again from step 0, on its own data and config
            return resuming.restart_without_checkpoint(self.run_dir, self.cfg)
        ckpt = read_checkpoint(path)
        overrides = resuming.check_continuation(ckpt.config, self.cfg.to_dict(), str(path))
        restore_run(ckpt, self.cfg, self.dist, self.model, self.optimizer, self.scaler, self.train_loader, self.guard,
                    self.ema, self.progress, self.clipper)
        self.saved_step = self.step
        aside = resuming.set_aside_later(self.run_dir, path) if self.dist.is_main else None
        return resume_note(path, ckpt.trainer_state, self.cfg.train.max_steps, self.dist.world_size,
                           self.global_batch, overrides, aside)

    @property
    def global_batch(self) -> int:  # sequences per optimizer step, over all ranks
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.dist.world_size

    # The counters live in `progress` (which the fault wrappers read); these name them as the loop does.
    step = property(lambda self: self.progress.step, lambda self, value: setattr(self.progress, "step", value))
    opt_step = property(lambda self: self.progress.opt_step)

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        try:
            with GracefulStop(world_size=self.dist.world_size) as self.stop:
                return self._train()
        except BaseException:  # Ctrl-C or an error mid-run: leave the process group (a no-op in one process)
            self.dist.close(wait=False)
            raise

    def _train(self) -> TrainResult:
        tc, guard = self.cfg.train, self.guard
        self.model.train()
        status, last_values = None, {"loss": math.nan}
        self.rollback.after_good_step(self.step, self.opt_step, guard.worth_keeping)
        while status is None and self.step < tc.max_steps:
            verdict, values, _ = self.train_step()
            self.log.throughput.add(self.log.tokens_per_step)
            if verdict.ok:
                last_values = values
                self.rollback.after_good_step(self.step, self.opt_step, guard.worth_keeping)
            elif verdict.action == "rollback":
                to_step = self.rollback.roll_back(self.progress)
                guard.rolled_back()
                self.log.event(self.step - 1, verdict, detail=f"restored step {to_step}, {guard.lr_note}",
                               restored_step=to_step, lr_scale=guard.lr_scale)
            else:
                self.log.event(self.step - 1, verdict)
                if verdict.action == "abort":
                    self.rollback.restore_weights(self.progress)  # the final checkpoint holds the last good ones
                    status = "aborted"
                    break
            self._log_step(values, verdict)
            status = self._step_boundary(verdict)
        status = status or "finished"
        if self.saved_step != self.step:
            self.save(self.progress.last_val)
        result = TrainResult(self.run_dir, self.step, self.opt_step, headline(last_values), self.progress.last_val,
                             status, guard.n_skips, guard.n_rollbacks, self.stop.signum)
        self.logger.log({"kind": "summary", "step": self.step, "status": status, "loss": result.train_loss,
                         "val_loss": result.val_loss, "skips": guard.n_skips, "rollbacks": guard.n_rollbacks})
        self.logger.close()
        # Become a one-process trainer: under FSDP the final weights are gathered into a plain Transformer (a model
        # passed in stays sharded), so sampling or evaluating after training needs no other rank.
        if self.dist.mode == "fsdp" and self.built_model:
            self.model = self._whole_copy(self.dist.full_model_state(self.model, everywhere=True))
            self.forward_model = self.model
        self.dist.close()
        return result

    def train_step(self) -> tuple[Verdict, dict[str, float], list[Batch]]:
        """Read -> forward/backward -> judge -> (on a fault: record) -> apply or drop; the verdict, values, batches."""
        batches, rank_ok = self.read_batches()
        stats = self.forward_backward(batches, rank_ok)
        verdict = self.guard.check(stats)
        if not verdict.ok and self.recorder is not None:
            verdict = self.recorder.record(verdict, stats, batches)
        self.apply(verdict, stats)
        self.step += 1
        return verdict, stats.values, batches

    def read_batches(self) -> tuple[list[Batch], bool]:
        """The step's grad_accum micro-batches, and whether their token ids all lie in [0, vocab_size): an
        out-of-range id would crash the embedding (a device assert on GPU), so it is checked on the host."""
        batches = []
        for micro in range(self.cfg.train.grad_accum):
            x, y = self.train_loader.next_batch()
            batches.append((x, y))
            if int(x.max()) >= self.data.vocab_size or int(x.min()) < 0:
                # Pass over the step's other micro-batches too: the data moves on as after any skipped step.
                self.train_loader.skip(self.cfg.train.grad_accum - 1 - micro)
                return batches, False
        return batches, True

    def forward_backward(self, batches: list[Batch], rank_ok: bool) -> StepStats:
        """Forward and backward over the micro-batches, then the step's global loss components and grad
        norm in one host read. Every rank must know whether any rank holds a bad batch before the first
        forward (DDP/FSDP collectives would wait forever on a rank that dropped out), so none runs then."""
        tc, step = self.cfg.train, self.step
        sample_stats = step % self.cfg.guard.stats_every == 0
        self.model.before_step(self.opt_step, track_stats=sample_stats)
        apply_lr_factor(self.optimizer, self.schedule(self.opt_step) * self.guard.lr_scale, self.guard.group_lr_scale)
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # host floats: the guard checks them, no sync
        if not self.dist.all_ok(rank_ok):
            return StepStats(step, math.nan, math.nan, False, {"loss": math.nan, "grad_norm": math.nan, "lr": lrs[0]},
                             rank=RankView(rank_ok), lrs=lrs)
        sums, logit_max = {}, None
        for micro, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.dist.grad_sync(self.forward_model, micro == tc.grad_accum - 1):
                with self._autocast():
                    out = self.train_objective(self.forward_model, x, y)
                loss = out.loss / tc.grad_accum
                self.scaler.scale(loss).backward()
            for name, value in out.losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / tc.grad_accum
            sums["loss"] = sums.get("loss", 0.0) + loss.detach().float()
            if sample_stats:
                logit_max = out.logits.detach().abs().max().float() if out.logits is not None else out.logit_max
        self.scaler.unscale_(self.optimizer)
        self.dist.sync_scaler(self.scaler, self.optimizer)
        local_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._local_grads())).float())
        # Every rank judges the global numbers, read to the host together: the one sync of the step.
        reduced, grad_norm = self.dist.reduce_step(list(sums.values()), local_norm)
        values = dict(zip([*sums, "grad_norm"], torch.stack([*reduced, grad_norm]).tolist()))
        if logit_max is not None:
            values["logit_max"] = float(logit_max)
        return StepStats(step, values["loss"], values["grad_norm"], True, {**values, "lr": lrs[0]}, grad_norm,
                         RankView(True, sums["loss"], local_norm), lrs, headline(values),
                         self.model.max_attention_logit(self.dist.max_) if sample_stats else None)

    def _local_grads(self) -> list[torch.Tensor]:
        # Under FSDP the local shards: views, so clipping them in place clips the gradients.
        return [local(p.grad) for p in self.params if p.grad is not None]

    def apply(self, verdict: Verdict, stats: StepStats) -> None:
        """Only an ok verdict changes anything: clip, noise, optimizer, scaler, the model's post-update
        work, EMA. Otherwise the update is dropped: weights, moments, scaler (but for an fp16 overflow,
        which lowers the scale), balance bias and opt_step stay exactly as they were."""
        tc = self.cfg.train
        if verdict.ok:
            grads = self._local_grads()
            clip_applied_step(grads, stats.device_grad_norm, stats.grad_norm, tc.grad_clip, self.clipper)
            if tc.grad_noise > 0:  # Neelakantan et al. 2015, sigma^2 = eta / (1 + t)^0.55
                sigma = math.sqrt(tc.grad_noise / (1 + self.opt_step) ** 0.55)
                for g in grads:  # ranks draw in lock-step, so DDP replicas add the same noise
                    g.add_(torch.randn_like(g), alpha=sigma)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            several = self.dist.world_size > 1  # one process: no collective, and no gather of loads for one
            self.model.after_optimizer_step(self.dist.sum_ if several else None, self.dist.max_ if several else None)
            if self.ema is not None:
                update_ema(self.ema, self.model, tc.ema_decay)
            self.progress.opt_step += 1
        else:
            if verdict.action == "overflow":
                self.scaler.update()  # lowers the scale; the step itself is dropped
            elif stats.batch_ok:  # fp16: end the scaler's step (its unscale_ record) at the same scale
                self.scaler.update(self.scaler.get_scale())
            self.model.after_skipped_step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log_step(self, values: dict[str, float], verdict: Verdict) -> None:
        self.log.step(self.step - 1, self.opt_step, self.guard.n_skips, values, verdict)

    def _step_boundary(self, verdict: Verdict) -> str | None:
        """Between two steps, where the run's state is whole: move the data past a rolled-back window,
        evaluate, save. Returns a status that ends the run, or None to go on."""
        tc, skip = self.cfg.train, self.cfg.guard.rollback_skip_batches
        if verdict.action == "rollback" and skip:
            # Only now, so the event and the record above name the step that faulted. A "batch" here
            # is a step's data: grad_accum loader batches, so steps and data stay in line.
            self.train_loader.skip(skip * tc.grad_accum)
            self.step += skip
        if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
            self.save(self._validate())
            if 0 < tc.early_stop_patience <= self.progress.evals_since_best:
                return "early-stopped"
        elif self.step % tc.save_every == 0:
            self.save(None)
        return "interrupted" if self.stop.should_stop(self.dist) else None  # every rank stops at one step

    # ---- eval and checkpoints ------------------------------------------------------------------

    def evaluate(self, model: Transformer | None = None) -> dict[str, float]:
        """Mean loss components over the first eval_batches validation batches (always the same ones)."""
        return validation_losses(model or self.model, self.objective, self.cfg, self.data, self.lookahead,
                                 self.dist, self._autocast)

    def _validate(self) -> float:
        """Evaluate (the EMA weights too, if kept), log the record and the console line; the headline val loss."""
        losses = self.evaluate()
        val = headline(losses)
        record = {"kind": "eval", "step": self.step, **{f"val_{k}": v for k, v in losses.items()}, "val_loss": val}
        if self.ema is not None:
            record["val_loss_ema"] = headline(self.evaluate(self.ema))
        self.logger.log(record)
        ema_note = f" (ema {record['val_loss_ema']:.4f})" if self.ema is not None else ""
        self.logger.write(f"step {self.step}: val loss {val:.4f}{ema_note}")
        self.progress.validated(val)
        return val

    def trainer_state(self) -> dict:
        """Everything but the weights that exact resume needs (under FSDP a collective: call on every rank)."""
        optimizer = self.dist.full_optimizer_state(self.model, self.optimizer)
        return {**dataclasses.asdict(self.progress), "optimizer": optimizer, "scaler": self.scaler.state_dict(),
                "loader": self.train_loader.state_dict(), "guard": self.guard.state_dict(),
                "clipper": self.clipper.state_dict() if self.clipper is not None else None,
                "rng": rng_state(), "world_size": self.dist.world_size, "global_batch": self.global_batch}

    def save(self, val_loss: float | None = None) -> Path:
        """Write a checkpoint (every rank calls this; rank 0 writes full, unsharded state)."""
        tc = self.cfg.train
        refuse_nonfinite_weights(self.model, self.step, self.dist)  # NaN weights are never a "good" checkpoint
        self.saved_step = self.step
        model_state, trainer_state = self.dist.full_model_state(self.model), self.trainer_state()
        if self.dist.is_main:
            ema = self.ema.state_dict() if self.ema is not None else None
            path = save_checkpoint(self.run_dir, self.step, model_state, trainer_state, self.cfg.to_dict(),
                                   val_loss=val_loss, ema_state=ema, keep_last=tc.keep_last, keep_best=tc.keep_best)
        self.dist.barrier()  # every rank returns once the checkpoint is complete on disk
        return path if self.dist.is_main else latest_checkpoint(self.run_dir)


def headline(losses: dict[str, float]) -> float:
    """The next-token loss, else the objective's total: the train and eval metric."""
    return losses.get("ce", losses["loss"])


def whole_copy(config: ModelConfig, device: torch.device, state: dict[str, torch.Tensor]) -> Transformer:
    """An unsharded model on `device` holding the full `state` (NPT blocks included). Its init runs under a
    forked RNG, so this rank's random stream stays in step with the others'."""
    with torch.random.fork_rng(devices=[]):
        return model_from_state(config, state).to(device)


def default_run_dir(preset: str) -> Path:
    if launched_by_torchrun()[2] > 1:  # each rank would read its own clock and pick its own directory
        raise ValueError("under torchrun pass --out RUN_DIR: every rank must write to the same run directory")
    return unique_run_dir("runs", preset)
