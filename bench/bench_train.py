"""Training throughput of one model config: tokens/s, MFU, step time, peak memory; or two configs side by side.

    python bench/bench_train.py --preset tiny                                  # CPU, fp32
    python bench/bench_train.py --preset tiny --set dim=256 n_layers=6 --batch 8 --seq 256
    python bench/bench_train.py --preset small --device cuda --precision bf16 --compile --json out.json
    python bench/bench_train.py --preset tiny --vs tiny-dense                   # A/B: ratio of B to A
    python bench/bench_train.py --preset tiny --vs-set loss_chunk=256 --vs-precision bf16

A step is one optimizer step on random tokens: forward (under autocast for bf16/fp16) -> backward
(GradScaler for fp16) -> clip to 1.0 -> fused AdamW -> MoE balance-bias update. Nothing else (no data
loading, no guard): this is the model's training speed, not the trainer's (bench/bench_guard.py measures
the guard, bench/vs_nanogpt.py the whole loop).

Method. `warmup` steps first (they include torch.compile's compilation), then `steps` timed steps; the
figures are medians (and the minimum, which is less sensitive to other processes on a shared machine).
With two configs (`--vs PRESET` and/or `--vs-*`), the timed steps alternate A, B, B, A, ... so both see the same machine load,
and the reported ratio is median(B) / median(A). CPU: one thread by default and flush-denormal
(DESIGN.md: 2-thread torch on a shared 2-core machine is erratic). CUDA: synchronize around each step.

FLOPs (the same formula as the trainer's MFU, Transformer.flops_per_token, PaLM appendix B / nanoGPT):
    flops/token = 6 * N_active + 6 * L_attn * n_heads * T * (d_qk + d_v)
N_active: parameters that take part in matmuls per token, embedding table excluded (the output head
counted, also when tied), MoE layers with only n_activated_experts of their routed experts plus shared
experts and router; MTP modules included (they run every step). L_attn: layers with attention, MTP
blocks included. The attention term counts all T keys per query (not halved for causality), as PaLM,
nanoGPT and torchtitan do. MFU = flops/token * tokens/s / dense peak of the GPU for the precision
(train/metrics.py: H100 SXM bf16 989 TF; fp8 runs still use the bf16 peak). CPU: no peak, so MFU is
null and achieved TFLOP/s is reported instead.

Memory. CUDA: torch.cuda.max_memory_allocated over the timed steps (weights, grads, optimizer state,
activations). CPU: the bytes autograd saves for backward in one forward (activation memory; see
bench/bench_model.py) and the process' peak RSS (one number for the whole process, so in --vs mode it
covers both models).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import saved_activation_bytes  # noqa: E402

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.train.metrics import device_peak_flops, mfu, peak_memory_gb  # noqa: E402

Precision = Literal["fp32", "bf16", "fp16", "auto"]


@dataclass
class Args:
    preset: str = "tiny"
    set: tuple[str, ...] = ()
    """ModelConfig overrides FIELD=VALUE (e.g. dim=256 n_routed_experts=0), and loss_chunk=N."""
    precision: Precision = "fp32"
    """auto: what `nanoseek train --hardware auto` picks for the device (train/hardware.py), fp8 included."""
    compile: bool = False
    fp8: bool = False
    """torchao float8 linears (CUDA >= 8.9, precision bf16), as --train.fp8."""
    vs: str | None = None
    """Preset of a second config, B, run interleaved with A; --vs-* change B only (default: as A)."""
    vs_set: tuple[str, ...] | None = None
    """Overrides of the second config (default: the first config's)."""
    vs_precision: Precision | None = None
    vs_compile: bool | None = None
    vs_fp8: bool | None = None
    batch: int = 8
    seq: int = 128
    vocab: int | None = None
    """Vocabulary size (default: the preset's)."""
    device: str = "cpu"
    steps: int = 20
    warmup: int = 3
    threads: int = 1
    """CPU threads (ignored on CUDA)."""
    seed: int = 0
    json: Path | None = None
    """Write the results here too."""


@dataclass
class Config:
    name: str
    preset: str
    overrides: dict
    precision: str
    compile: bool
    loss_chunk: int = 0
    fp8: bool = False


def parse_overrides(items: tuple[str, ...]) -> tuple[dict, int]:
    """FIELD=VALUE strings -> (ModelConfig overrides typed like the fields, loss_chunk)."""
    hints = typing.get_type_hints(ModelConfig)
    overrides, loss_chunk = {}, 0
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write FIELD=VALUE, e.g. dim=256")
        if name == "loss_chunk":
            loss_chunk = int(raw)
            continue
        if name not in hints:
            raise SystemExit(f"--set {name!r}: not a ModelConfig field (see nanoseek/config.py)")
        default = getattr(ModelConfig(), name)
        if isinstance(default, bool):
            overrides[name] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            overrides[name] = int(raw)
        elif isinstance(default, float):
            overrides[name] = float(raw)
        elif default is None:  # int | None fields (n_kv_heads, head_dim)
            overrides[name] = None if raw.lower() == "none" else int(raw)
        else:
            overrides[name] = raw
    return overrides, loss_chunk


class Bench:
    """One config built and ready to step. idx [batch, seq], targets [batch, seq + mtp_depth]."""

    def __init__(self, cfg: Config, args: Args, device: torch.device):
        self.cfg, self.device = cfg, device
        overrides = dict(cfg.overrides)
        if args.vocab:
            overrides["vocab_size"] = args.vocab
        overrides["max_seq_len"] = max(overrides.get("max_seq_len", 0), args.seq)
        self.model_config = ModelConfig.from_preset(cfg.preset, **overrides)
        torch.manual_seed(args.seed)
        self.model = Transformer(self.model_config).to(device).train()
        self.model.set_training_options(loss_chunk=cfg.loss_chunk)
        if cfg.fp8:
            from nanoseek.train.fp8 import enable_fp8

            if cfg.precision != "bf16":
                raise SystemExit("--fp8 needs --precision bf16 (fp8 matmuls run inside a bf16 autocast)")
            try:
                enable_fp8(self.model, device)
            except ValueError as err:
                raise SystemExit(f"--fp8: {err}") from None
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        gen = torch.Generator().manual_seed(args.seed)
        vocab = self.model_config.vocab_size
        self.idx = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
        self.targets = torch.randint(0, vocab, (args.batch, args.seq + self.model_config.mtp_depth),
                                     generator=gen).to(device)
        self.tokens = args.batch * args.seq
        self.flops_per_token = self.model.flops_per_token(args.seq)
        self.times: list[float] = []

    def step(self) -> float:
        """One optimizer step; returns its wall time in seconds."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.forward(self.idx, self.targets).loss
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_balance_bias()
        sync()
        return time.perf_counter() - start

    def report(self) -> dict:
        med = statistics.median(self.times)
        tps = self.tokens / med
        peak = device_peak_flops(self.device, self.cfg.precision)
        record = {
            "name": self.cfg.name, "preset": self.cfg.preset, "overrides": self.cfg.overrides,
            "precision": self.cfg.precision, "fp8": self.cfg.fp8, "compile": self.cfg.compile,
            "loss_chunk": self.cfg.loss_chunk,
            "params": self.model.num_params(), "active_params": self.model.num_params(active=True),
            "flops_per_token": self.flops_per_token, "step_ms_median": med * 1e3,
            "step_ms_min": min(self.times) * 1e3, "tokens_per_sec": tps,
            "achieved_tflops": self.flops_per_token * tps / 1e12, "mfu": mfu(self.flops_per_token, tps, peak),
            "peak_tflops": peak / 1e12 if peak else None,
        }
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
                record["saved_activation_mib"] = saved_activation_bytes(self.model, self.idx, self.targets) / 2**20
            self.model.zero_grad(set_to_none=True)
            record["process_peak_rss_gib"] = peak_memory_gb("cpu")
        return record


def resolve_precision(precision: str, fp8: bool, device: torch.device) -> tuple[str, bool]:
    if precision != "auto":
        return precision, fp8
    from nanoseek.train.hardware import detect

    choice = detect(device)
    print(f"--precision auto -> {choice.precision}{' + fp8' if choice.fp8 else ''}: {choice.reason}")
    return choice.precision, choice.fp8


def configs(args: Args, device: torch.device) -> list[Config]:
    overrides, chunk = parse_overrides(args.set)
    precision, fp8 = resolve_precision(args.precision, args.fp8, device)
    first = Config("A", args.preset, overrides, precision, args.compile, chunk, fp8)
    vs = (args.vs, args.vs_set, args.vs_precision, args.vs_compile, args.vs_fp8)
    if all(v is None for v in vs):
        return [first]
    vs_overrides, vs_chunk = parse_overrides(args.vs_set) if args.vs_set is not None else (overrides, chunk)
    vs_precision, vs_fp8 = resolve_precision(args.vs_precision or args.precision,
                                             args.fp8 if args.vs_fp8 is None else args.vs_fp8, device)
    second = Config("B", args.vs or args.preset, vs_overrides, vs_precision,
                    args.compile if args.vs_compile is None else args.vs_compile, vs_chunk, vs_fp8)
    return [first, second]


def main(args: Args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
    benches = [Bench(cfg, args, device) for cfg in configs(args, device)]
    for bench in benches:
        for _ in range(args.warmup):
            bench.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.steps):
        order = benches if i % 2 == 0 else benches[::-1]  # A B, B A, ...: both see the same load
        for bench in order:
            bench.times.append(bench.step())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "device": device_name, "threads": args.threads if device.type == "cpu" else None,
              "load_avg": os.getloadavg()[0], "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "warmup": args.warmup, "runs": [b.report() for b in benches]}
    if len(benches) == 2:
        a, b = result["runs"]
        result["ratio_b_over_a"] = {"step_ms_median": b["step_ms_median"] / a["step_ms_median"],
                                    "step_ms_min": b["step_ms_min"] / a["step_ms_min"]}
    for run in result["runs"]:
        mfu_text = f"MFU {run['mfu'] * 100:.1f}%" if run["mfu"] is not None else f"{run['achieved_tflops'] * 1e3:.2f} GFLOP/s"
        mem = (f"peak {run['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in run
               else f"saved activations {run['saved_activation_mib']:.1f} MiB")
        label = " ".join([run["preset"], *(f"{k}={v}" for k, v in run["overrides"].items()), run["precision"]]
                         + (["fp8"] if run["fp8"] else []) + (["compile"] if run["compile"] else [])
                         + ([f"loss_chunk={run['loss_chunk']}"] if run["loss_chunk"] else []))
        print(f"{run['name']}: {label}: step {run['step_ms_median']:.1f} ms (min {run['step_ms_min']:.1f}), "
              f"{run['tokens_per_sec']:,.0f} tok/s, {mfu_text}, {mem}")
    if "ratio_b_over_a" in result:
        print(f"B / A step time: {result['ratio_b_over_a']['step_ms_median']:.3f} (median), "
              f"{result['ratio_b_over_a']['step_ms_min']:.3f} (min)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
