"""What a run writes per step: the train record (values, sampled health statistics, tokens/s, MFU, peak
memory), guard events, the progress bar. Only rank 0 writes; the others skip the host reads too."""

from pathlib import Path

from nanoseek.config import RunConfig
from nanoseek.train.guard import Verdict
from nanoseek.train.metrics import MetricsLogger, Throughput, device_peak_flops, mfu, peak_memory_gb


class StepLog:
    def __init__(self, cfg: RunConfig, run_dir: Path, model, device, world_size: int, is_main: bool,
                 start_step: int, show_progress: bool):
        tc = cfg.train
        self.cfg, self.model, self.device, self.is_main = cfg, model, device, is_main
        self.logger = MetricsLogger(run_dir, tensorboard=tc.tensorboard, wandb=tc.wandb,
                                    wandb_project=tc.wandb_project, config=cfg.to_dict(), total_steps=tc.max_steps,
                                    start_step=start_step, show_progress=show_progress, enabled=is_main)
        self.throughput = Throughput()
        self.tokens_per_step = tc.batch_size * tc.grad_accum * cfg.data.seq_len * world_size  # global
        peak = device_peak_flops(device, tc.precision)
        self.peak_flops = peak * world_size if peak is not None else None  # tokens/s are global
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)

    def event(self, step: int, verdict: Verdict, **extra) -> None:
        record = {"kind": "event", "event": verdict.action, "step": step, "cause": verdict.cause,
                  "module": verdict.module, "action": verdict.action, "value": verdict.value, **extra}
        where = f" in {verdict.module}" if verdict.module else ""
        detail = f" ({extra['detail']})" if extra.get("detail") else ""
        self.logger.event(record, f"[guard] step {step}: {verdict.cause}{where} -> {verdict.action}{detail}")

    def step(self, step: int, opt_step: int, n_skips: int, values: dict[str, float], verdict: Verdict) -> None:
        """The record of data step `step` (done), with `opt_step` updates applied so far."""
        if not self.is_main:  # no host reads for a record nobody writes
            return
        record = {"kind": "train", "step": step, "opt_step": opt_step, "action": verdict.action,
                  "skipped_steps": n_skips, **values}
        if step % self.cfg.guard.stats_every == 0:
            record.update(self.model.health_stats())
        if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.cfg.train.max_steps:
            tps = self.throughput.rate()
            record.update(tokens_per_sec=tps, mfu=mfu(self.flops_per_token, tps, self.peak_flops),
                          peak_mem_gb=peak_memory_gb(self.device))
        self.logger.log(record)
        shown = {"ce": values["ce"]} if "ce" in values else {"loss": values.get("loss")}  # as the val loss reads
        self.logger.progress(step, **shown, tok_s=record.get("tokens_per_sec"))
