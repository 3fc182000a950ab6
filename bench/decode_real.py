"""Generation on a real model: nanoseek against transformers' generate, with a memory-bandwidth roofline.

    python bench/bench_decode.py --real /path/to/smollm2-135m-instruct --dtype bfloat16

The same folder is loaded by transformers (AutoModelForCausalLM) and by nanoseek (import_hf, then
prepare_for_generation: linears prepacked for oneDNN on CPU); greedy, `new_tokens` tokens after the same
prompts, no end-of-text stop on either side. Batch 1 is the first prompt; larger batches take that many of
PROMPTS, whose lengths differ: a ragged batch, left-padded with an attention mask for transformers and with
per-row positions for nanoseek. Every timed run's tokens are compared with transformers' (row by row).
transformers runs with its default dynamic cache and with cache_implementation="static"; the faster of the
two is the reference. Runs are interleaved in a rotating order; medians over repeats. Also reported:
- step: nanoseek's decode-step time (time after the first token / (new_tokens - 1));
- roofline: weight bytes read per step (every parameter once; the tied head counted once) / step, against
  the copy bandwidth measured here in the same rotation (one thread copying a 256 MiB tensor; bytes read +
  written / time, as STREAM's Copy counts them) and against the read-only bandwidth (a sum over it).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from nanoseek.generate import GREEDY, prepare_for_generation, stream

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three most important ideas in computer science are",
    "Here is a recipe for a simple tomato soup. First,",
    "Dear diary, today",
    "The history of the printing press begins in the fifteenth century, when a goldsmith from Mainz named",
    "Photosynthesis is the process by which",
    "In the year 2150, humanity finally reached the outer planets, and the first colony on Titan",
    "A good night's sleep matters because",
]
BANDWIDTH_BYTES = 256 * 2**20


def measure_bandwidth(tries: int = 5) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s) of one thread over a 256 MiB tensor: the best
    of `tries` each (the least disturbed by other jobs; what the memory system can give one thread)."""
    src = torch.ones(BANDWIDTH_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy, read = [], []
    for _ in range(tries):
        start = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * src.nbytes / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        src.sum()
        read.append(src.nbytes / (time.perf_counter() - start) / 1e9)
    return max(copy), max(read)


def load(folder: str, dtype: torch.dtype, compile: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoseek.interop.importer import import_hf

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    reference.generation_config.eos_token_id = None  # exactly new_tokens tokens, as nanoseek without eos_id
    model = import_hf(folder, dtype)
    packed = prepare_for_generation(model, pack=not compile)
    return tokenizer, reference, model, packed


class Clock:
    """Wall seconds and this process's CPU seconds since creation. On a machine shared with other jobs the
    CPU time leaves out the time the scheduler gave to others (memory-bandwidth contention stays in both)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_transformers(reference, tokenizer, prompts: list[str], new_tokens: int, cache: str | None):
    """((wall, cpu) seconds, new tokens [B, n]) of transformers' generate on a left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    extra = {"cache_implementation": cache} if cache else {}
    clock = Clock()
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=tokenizer.pad_token_id, **extra)
    return clock.read(), out[:, batch.input_ids.shape[1]:]


def run_nanoseek(model, tokenizer, prompts: list[str], new_tokens: int, compile: bool):
    """((wall, cpu) seconds, (wall, cpu) to the first token, new tokens [B, n]) of nanoseek, same prompts."""
    from nanoseek.generate import pad_prompts

    ids, pad = pad_prompts([tokenizer(p).input_ids for p in prompts])
    clock = Clock()
    pieces, first = [], None
    for nxt in stream(model, ids, new_tokens, GREEDY, pad=pad if pad.any() else None, compile=compile):
        pieces.append(nxt)
        first = first or clock.read()
    return clock.read(), first, torch.cat(pieces, dim=1)


def first_difference(got: torch.Tensor, want: torch.Tensor) -> str:
    """'same' or where the first differing token is (row, index)."""
    if got.shape == want.shape and torch.equal(got, want):
        return "same"
    if got.shape != want.shape:
        return f"shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    row, col = (got != want).nonzero()[0].tolist()
    return f"row {row} differs from token {col}"


def compare(folder: str, dtype: torch.dtype, batch_sizes: tuple[int, ...], new_tokens: int, repeats: int,
            compile: bool = False) -> None:
    """Interleaved runs of transformers (dynamic, static cache) and nanoseek; prints a table and JSON lines."""
    torch.set_num_threads(1)
    tokenizer, reference, model, packed = load(folder, dtype, compile)
    weight_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())  # tied weights once
    runners = {"transformers": lambda b, n: run_transformers(reference, tokenizer, PROMPTS[:b], n, None),
               "transformers-static": lambda b, n: run_transformers(reference, tokenizer, PROMPTS[:b], n, "static"),
               "nanoseek": lambda b, n: run_nanoseek(model, tokenizer, PROMPTS[:b], n, compile)}
    start = time.perf_counter()
    for b in batch_sizes:  # warm-up (and, with compile, the compilation for each batch size)
        for run in runners.values():
            run(b, 4)
    print(f"# warm-up{' and compilation' if compile else ''}: {time.perf_counter() - start:.1f}s")
    times, steps, bandwidth, checks = {}, {}, [], {}
    cases = [(name, b) for b in batch_sizes for name in runners]
    for r in range(repeats):
        bandwidth.append(measure_bandwidth())
        for name, b in cases[r % len(cases):] + cases[:r % len(cases)]:
            out = runners[name](b, new_tokens)
            times.setdefault((name, b), []).append(out[0])
            if name == "nanoseek":
                steps.setdefault(b, []).append([(t - f) / (new_tokens - 1) for t, f in zip(out[0], out[1])])
            checks.setdefault(b, {})[name] = out[-1]
    report(times, steps, bandwidth, checks, weight_bytes, new_tokens, dtype, packed, compile)


def report(times, steps, bandwidth, checks, weight_bytes, new_tokens, dtype, packed, compile) -> None:
    """times[(who, batch)]: [(wall, cpu)] per repeat; steps[batch]: nanoseek's [(wall, cpu)] decode step."""
    copy_bw = statistics.median(c for c, _ in bandwidth)
    read_bw = statistics.median(r for _, r in bandwidth)
    print(f"# {dtype}, {new_tokens} new tokens, greedy; nanoseek {packed} linears prepacked, "
          f"{'compiled' if compile else 'eager'} step; weights {weight_bytes / 1e6:.1f} MB; "
          f"copy bandwidth {copy_bw:.2f} GB/s (read+write), read-only {read_bw:.2f} GB/s (medians)")
    print(f"{'batch':>5} {'who':<20} {'tok/s wall':>10} {'x best':>7} {'tok/s cpu':>10} {'x best':>7}  tokens")
    for b in sorted(checks):
        medians = {name: [statistics.median(t[i] for t in v) for i in (0, 1)]
                   for (name, batch), v in times.items() if batch == b}
        best = [min(m[i] for name, m in medians.items() if name.startswith("transformers")) for i in (0, 1)]
        for name, (wall, cpu) in medians.items():
            same = first_difference(checks[b]["nanoseek"], checks[b][name]) if name != "nanoseek" else "-"
            print(f"{b:>5} {name:<20} {b * new_tokens / wall:>10.1f} {best[0] / wall:>7.2f} "
                  f"{b * new_tokens / cpu:>10.1f} {best[1] / cpu:>7.2f}  {same}")
            print(json.dumps({"batch": b, "who": name, "tokens_per_s_wall": b * new_tokens / wall,
                              "tokens_per_s_cpu": b * new_tokens / cpu, "vs_best_transformers_wall": best[0] / wall,
                              "vs_best_transformers_cpu": best[1] / cpu, "tokens_vs_nanoseek": same,
                              "dtype": str(dtype), "compiled": compile}))
        for i, clock in enumerate(("wall", "cpu")):
            step = statistics.median(s[i] for s in steps[b])
            rate = weight_bytes / step / 1e9
            print(f"{b:>5} roofline ({clock} time): step {step * 1e3:.1f} ms, weights read at {rate:.2f} GB/s = "
                  f"{100 * rate / copy_bw:.0f}% of copy bandwidth, {100 * rate / read_bw:.0f}% of read-only")
            print(json.dumps({"batch": b, "clock": clock, "step_ms": step * 1e3, "weight_gb_per_s": rate,
                              "copy_gb_per_s": copy_bw, "read_gb_per_s": read_bw, "fraction_of_copy": rate / copy_bw}))
