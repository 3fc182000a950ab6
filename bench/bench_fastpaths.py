"""Before/after figures for the training fast paths (CPU here; GPU-only paths say so).

    python bench/bench_fastpaths.py                     # everything below, CPU, 1 thread
    python bench/bench_fastpaths.py --parts moe ce      # a subset: moe, ce, compile, precision, fp8

moe        MoE expert dispatch: Experts.forward (tokens sorted by expert, torch._grouped_mm, no host sync)
           vs `per_expert_loop` (a Python loop over experts with a boolean mask and one host sync each),
           forward and forward+backward, fp32 and bf16 autocast. Both compute the same values
           (tests/test_fastpaths.py).
ce         Chunked cross-entropy (train.loss_chunk) vs full logits at a large vocabulary: peak memory
           of the loss step (final hidden -> head -> CE -> backward) and its time. Peak memory is the
           process' peak RSS over the step (Linux: VmHWM, reset just before the step through
           /proc/self/clear_refs) minus its RSS before, each variant in a fresh process; inputs, weights
           and the weight gradient are allocated before, so the figure is what the loss itself needs.
adamw      AdamW step alone: torch's foreach implementation (the default before) vs fused (one kernel over
           all parameters; now the default on CPU and CUDA), on nanoGPT's shakespeare-char shape and `tiny`.
compile    torch._dynamo.explain of the training forward (graphs, graph breaks) for MoE and MTP configs,
           fp32 and bf16; then eager vs torch.compile step time (compile time reported apart).
precision  fp32 vs bf16 autocast vs fp16 autocast + GradScaler on CPU: do they run, their step time.
fp8        torchao float8: needs CUDA >= 8.9; on CPU the refusal message is shown.

Method: timings interleave the variants step by step (A B B A ...), after warm-up, and report medians;
one thread and flush-denormal on CPU (DESIGN.md). Results print as tables and one JSON object.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import Args as TrainArgs, Bench, Config  # noqa: E402

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.model.moe import Experts, per_expert_loop  # noqa: E402
from nanoseek.model.transformer import _cross_entropy, chunked_cross_entropy  # noqa: E402

PARTS = ("moe", "ce", "adamw", "compile", "precision", "fp8")


@dataclass
class Args:
    parts: tuple[str, ...] = PARTS
    repeats: int = 15
    threads: int = 1
    # moe
    moe_tokens: int = 2048
    moe_shapes: tuple[str, ...] = ("128:8:2", "256:8:2", "128:32:4")
    """DIM:EXPERTS:TOP_K; each expert's width is DIM / 2."""
    # ce
    vocab: int = 49152
    ce_dim: int = 576  # smoldeepseek-135m's width, vocab 49152
    ce_tokens: int = 2048
    ce_chunks: tuple[int, ...] = (0, 1024, 512, 128)
    """0 = full logits (the plain path)."""
    # compile
    compile_steps: int = 10
    json: Path | None = None


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each fn, alternating the order every round."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


# ---- MoE dispatch --------------------------------------------------------------------------------

def bench_moe(args: Args) -> list[dict]:
    rows = []
    for shape in args.moe_shapes:
        dim, n_experts, top_k = (int(v) for v in shape.split(":"))
        inter = dim // 2
        cfg = ModelConfig(dim=dim, n_heads=4, moe_inter_dim=inter, n_routed_experts=n_experts,
                          n_activated_experts=top_k, mtp_depth=0)
        experts = Experts(cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * dim ** -0.5)
        x = torch.randn(args.moe_tokens, dim, generator=gen, requires_grad=True)
        scores = torch.rand(args.moe_tokens, n_experts, generator=gen)
        weights, indices = scores.topk(top_k, dim=-1)
        grad = torch.randn(args.moe_tokens, dim, generator=gen)
        for precision in ("fp32", "bf16"):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

            def forward(fn):
                def run():
                    with torch.no_grad(), autocast:
                        fn(experts, x, weights, indices)
                return run

            def train(fn):
                def run():
                    with autocast:
                        out = fn(experts, x, weights, indices)
                    out.backward(grad)
                    x.grad = None
                    experts.zero_grad(set_to_none=True)
                return run

            grouped = lambda e, *a: e(*a)  # noqa: E731
            times = interleaved({"loop fwd": forward(per_expert_loop), "grouped fwd": forward(grouped),
                                 "loop fwd+bwd": train(per_expert_loop), "grouped fwd+bwd": train(grouped)},
                                args.repeats)
            row = {"dim": dim, "inter": inter, "experts": n_experts, "top_k": top_k,
                   "tokens": args.moe_tokens, "precision": precision, **{k: ms(v) for k, v in times.items()}}
            row["speedup fwd"] = row["loop fwd"] / row["grouped fwd"]
            row["speedup fwd+bwd"] = row["loop fwd+bwd"] / row["grouped fwd+bwd"]
            rows.append(row)
            print(f"moe dim {dim} inter {inter} E={n_experts} k={top_k} {args.moe_tokens} tokens "
                  f"{precision}: fwd loop {row['loop fwd']:.2f} ms, grouped {row['grouped fwd']:.2f} ms "
                  f"({row['speedup fwd']:.2f}x); fwd+bwd loop {row['loop fwd+bwd']:.2f} ms, grouped "
                  f"{row['grouped fwd+bwd']:.2f} ms ({row['speedup fwd+bwd']:.2f}x)", flush=True)
    return rows


# ---- chunked cross-entropy -----------------------------------------------------------------------

def _loss_step_inputs(vocab: int, dim: int, tokens: int):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(std=dim ** -0.5, generator=gen)
    hidden = torch.randn(1, tokens, dim, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens), generator=gen)
    return head, hidden, targets


def loss_step(head, hidden, targets, chunk: int) -> torch.Tensor:
    """hidden [1, N, dim] -> mean CE; backward into hidden and head.weight."""
    if chunk:
        loss = chunked_cross_entropy(head, hidden, targets, chunk)[0]
    else:
        loss = _cross_entropy(head(hidden), targets)  # the model's plain path: full fp32 logits
    loss.backward()
    return loss.detach()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def ce_memory_worker(spec: dict) -> None:
    """In a fresh process: the peak-RSS rise of one loss step."""
    torch.set_num_threads(1)
    # Warm-up on a small problem: the first checkpoint call imports modules worth ~70 MiB of RSS, which
    # is not memory the loss needs.
    loss_step(*_loss_step_inputs(64, 8, 16), min(spec["chunk"], 8))
    head, hidden, targets = _loss_step_inputs(spec["vocab"], spec["dim"], spec["tokens"])
    head.weight.grad = torch.zeros_like(head.weight)  # allocated before the baseline: both paths need it
    hidden.grad = torch.zeros_like(hidden)
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs)
        Path("/proc/self/clear_refs").write_text("5")
        before, peak = _status_kib("VmRSS"), lambda: _status_kib("VmHWM")
    except OSError:  # elsewhere: the lifetime peak, which an earlier import may already have set higher
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    loss = loss_step(head, hidden, targets, spec["chunk"])
    print(json.dumps({"peak_rise_mib": (peak() - before) / 1024, "loss": float(loss)}))


def bench_ce(args: Args) -> list[dict]:
    rows = []
    logits_mib = args.ce_tokens * args.vocab * 4 / 2**20
    for chunk in args.ce_chunks:
        spec = {"vocab": args.vocab, "dim": args.ce_dim, "tokens": args.ce_tokens, "chunk": chunk}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_ce_memory", json.dumps(spec)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                   # A fixed mmap threshold turns off glibc's
                                                                   # dynamic one, which keeps freed multi-MiB
                                                                   # blocks in the heap: RSS then tracks live
                                                                   # tensors (mallopt(3), M_MMAP_THRESHOLD).
                                                                   "MALLOC_MMAP_THRESHOLD_": "131072"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        rows.append({"chunk": chunk, **json.loads(proc.stdout.strip().splitlines()[-1])})
    head, hidden, targets = _loss_step_inputs(args.vocab, args.ce_dim, args.ce_tokens)

    def step(chunk):
        def run():
            loss_step(head, hidden, targets, chunk)
            head.weight.grad = hidden.grad = None
        return run

    times = interleaved({row["chunk"]: step(row["chunk"]) for row in rows}, max(3, args.repeats // 3), warmup=1)
    base = rows[0]
    for row in rows:
        row["step_ms"] = ms(times[row["chunk"]])
        row["memory_vs_plain"] = row["peak_rise_mib"] / max(base["peak_rise_mib"], 1e-9)
        row["time_vs_plain"] = row["step_ms"] / base["step_ms"]
        label = "full logits" if row["chunk"] == 0 else f"chunk {row['chunk']}"
        print(f"ce vocab {args.vocab} dim {args.ce_dim} {args.ce_tokens} tokens, {label}: peak +{row['peak_rise_mib']:.0f} MiB "
              f"({row['memory_vs_plain']:.2f}x; one fp32 logits tensor = {logits_mib:.0f} MiB), "
              f"step {row['step_ms']:.0f} ms ({row['time_vs_plain']:.2f}x), loss {row['loss']:.6f}", flush=True)
    return rows


# ---- AdamW: foreach vs fused ---------------------------------------------------------------------

def bench_adamw(args: Args) -> list[dict]:
    rows = []
    shapes = {"nanoGPT shakespeare-char shape (0.82M)": ModelConfig.from_preset(
        "tiny-gqa", n_kv_heads=4, inter_dim=352, max_seq_len=64, vocab_size=66),
        "tiny (2.4M)": ModelConfig.from_preset("tiny")}
    for name, cfg in shapes.items():
        steps = {}
        for impl in ("foreach", "fused"):
            model = Transformer(cfg)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
                                    **{impl: True})
            steps[impl] = opt.step
        times = interleaved(steps, args.repeats * 4)
        row = {"model": name, "foreach_ms": ms(times["foreach"]), "fused_ms": ms(times["fused"])}
        row["speedup"] = row["foreach_ms"] / row["fused_ms"]
        rows.append(row)
        print(f"adamw {name}: foreach {row['foreach_ms']:.2f} ms, fused {row['fused_ms']:.2f} ms "
              f"({row['speedup']:.1f}x)", flush=True)
    return rows


# ---- torch.compile -----------------------------------------------------------------------------

def bench_compile(args: Args) -> dict:
    out = {"explain": []}
    idx = torch.randint(0, 2048, (2, 64))
    targets = torch.randint(0, 2048, (2, 66))
    for name, overrides in (("tiny (MLA+MoE+MTP modules)", {}),
                            ("tiny, shared MTP x2", {"mtp_kind": "shared", "mtp_depth": 2}),
                            ("tiny, loss_chunk 32", {"loss_chunk": 32})):
        chunk = overrides.pop("loss_chunk", 0)
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", max_seq_len=64, **overrides)).train()
        model.loss_chunk = chunk
        for precision in ("fp32", "bf16"):
            torch._dynamo.reset()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                explanation = torch._dynamo.explain(lambda i, t: model(i, t).loss)(idx, targets)
            reasons = [r.reason.splitlines()[0] for r in explanation.break_reasons]
            out["explain"].append({"model": name, "precision": precision, "graphs": explanation.graph_count,
                                   "graph_breaks": explanation.graph_break_count, "reasons": reasons})
            print(f"compile explain {name} {precision}: {explanation.graph_count} graph(s), "
                  f"{explanation.graph_break_count} break(s) {reasons}", flush=True)
    torch._dynamo.reset()
    targs = TrainArgs(preset="tiny", batch=8, seq=128, steps=args.compile_steps)
    eager = Bench(Config("eager", "tiny", {}, "fp32", False), targs, torch.device("cpu"))
    compiled = Bench(Config("compile", "tiny", {}, "fp32", True), targs, torch.device("cpu"))
    start = time.perf_counter()
    compiled.step()  # compiles forward and backward
    compile_s = time.perf_counter() - start
    times = interleaved({"eager": eager.step, "compiled": compiled.step}, args.compile_steps)
    out["timing"] = {"model": "tiny fp32, batch 8 x 128", "compile_s": compile_s,
                     "eager_ms": ms(times["eager"]), "compiled_ms": ms(times["compiled"]),
                     "speedup": ms(times["eager"]) / ms(times["compiled"])}
    print(f"compile: tiny fp32 batch 8x128: eager {out['timing']['eager_ms']:.1f} ms, compiled "
          f"{out['timing']['compiled_ms']:.1f} ms ({out['timing']['speedup']:.2f}x), first step (compile) "
          f"{compile_s:.0f} s", flush=True)
    return out


# ---- precisions on CPU -------------------------------------------------------------------------

def bench_precision(args: Args) -> list[dict]:
    targs = TrainArgs(preset="tiny", batch=8, seq=128)
    benches, rows = {}, []
    for precision in ("fp32", "bf16", "fp16"):
        try:
            benches[precision] = Bench(Config(precision, "tiny", {}, precision, False), targs, torch.device("cpu"))
            benches[precision].step()
        except Exception as err:  # report what this CPU/torch cannot do instead of stopping the bench
            rows.append({"precision": precision, "runs": False, "error": f"{type(err).__name__}: {err}"})
            benches.pop(precision, None)
    times = interleaved({p: b.step for p, b in benches.items()}, args.repeats)
    for precision, bench in benches.items():
        with torch.no_grad(), torch.autocast("cpu", dtype=bench.dtype, enabled=bench.dtype is not None):
            loss = float(bench.model(bench.idx, bench.targets).loss)
        rows.append({"precision": precision, "runs": True, "step_ms": ms(times[precision]), "loss": loss,
                     "finite": loss == loss and abs(loss) != float("inf"),
                     "grad_scaler": bench.scaler.is_enabled(), "scale": bench.scaler.get_scale() if bench.scaler.is_enabled() else None})
    base = next((r["step_ms"] for r in rows if r["precision"] == "fp32" and r["runs"]), None)
    for row in rows:
        if row["runs"]:
            row["vs_fp32"] = row["step_ms"] / base if base else None
            print(f"precision {row['precision']}: runs, step {row['step_ms']:.1f} ms ({row['vs_fp32']:.2f}x fp32), "
                  f"loss {row['loss']:.4f}{', GradScaler scale %g' % row['scale'] if row['grad_scaler'] else ''}", flush=True)
        else:
            print(f"precision {row['precision']}: does not run here: {row['error']}", flush=True)
    return rows


def bench_fp8(args: Args) -> dict:
    from nanoseek.train.fp8 import enable_fp8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Transformer(ModelConfig.from_preset("tiny"))
    try:
        converted = enable_fp8(model.to(device), device)
        result = {"device": str(device), "converted": converted}
        print(f"fp8: {len(converted)} linears converted on {device}")
    except ValueError as err:
        result = {"device": str(device), "refused": str(err)}
        print(f"fp8 on {device}: refused: {err}")
    return result


def run_parts(args, known: tuple[str, ...], benches: dict, **header) -> None:
    """Run `benches[f"bench_{part}"](args)` for each of args.parts (1 thread by default, flush-denormal) and
    print (and with args.json, write) one JSON object: date, torch, threads, `header`, load, each part."""
    unknown = [p for p in args.parts if p not in known]
    if unknown:
        raise SystemExit(f"--parts {unknown[0]!r}: unknown; choose from {', '.join(known)}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "threads": args.threads, **header, "load_avg_start": os.getloadavg()[0]}
    for part in args.parts:
        result[part] = benches[f"bench_{part}"](args)
    result["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def main(args: Args) -> None:
    run_parts(args, PARTS, globals())


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_ce_memory":
        ce_memory_worker(json.loads(sys.argv[2]))
    else:
        main(tyro.cli(Args))
