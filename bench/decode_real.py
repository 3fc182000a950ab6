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


def measure_bandwidth() -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s) of one thread over a 256 MiB tensor."""
    src = torch.ones(BANDWIDTH_BYTES // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    dst.copy_(src)
    copy = 2 * src.nbytes / (time.perf_counter() - start) / 1e9
    start = time.perf_counter()
    src.sum()
    return copy, src.nbytes / (time.perf_counter() - start) / 1e9


def load(folder: str, dtype: torch.dtype, compile: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoseek.interop.importer import import_hf

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    reference.generation_config.eos_token_id = None  # exactly new_tokens tokens, as nanoseek without eos_id
    model = import_hf(folder, dtype)
    packed = prepare_for_generation(model, pack=not compile)
    return tokenizer, reference, model, packed


def run_transformers(reference, tokenizer, prompts: list[str], new_tokens: int, cache: str | None):
    """(seconds, new tokens [B, n]) of transformers' generate on a left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    extra = {"cache_implementation": cache} if cache else {}
    start = time.perf_counter()
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                                 temperature=None, pad_token_id=tokenizer.pad_token_id, **extra)
    return time.perf_counter() - start, out[:, batch.input_ids.shape[1]:]


def run_nanoseek(model, tokenizer, prompts: list[str], new_tokens: int, compile: bool):
    """(seconds, seconds to the first token, new tokens [B, n]) of nanoseek on the same prompts."""
    from nanoseek.generate import pad_prompts

    ids, pad = pad_prompts([tokenizer(p).input_ids for p in prompts])
    start = time.perf_counter()
    pieces, first = [], None
    for nxt in stream(model, ids, new_tokens, GREEDY, pad=pad if pad.any() else None, compile=compile):
        pieces.append(nxt)
        first = first or time.perf_counter() - start
    return time.perf_counter() - start, first, torch.cat(pieces, dim=1)


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
                steps.setdefault(b, []).append((out[0] - out[1]) / (new_tokens - 1))
            checks.setdefault(b, {})[name] = out[-1]
    report(times, steps, bandwidth, checks, weight_bytes, new_tokens, dtype, packed, compile)


def report(times, steps, bandwidth, checks, weight_bytes, new_tokens, dtype, packed, compile) -> None:
    copy_bw = statistics.median(c for c, _ in bandwidth)
    read_bw = statistics.median(r for _, r in bandwidth)
    print(f"# {dtype}, {new_tokens} new tokens, greedy; nanoseek {packed} linears prepacked, "
          f"{'compiled' if compile else 'eager'} step; weights {weight_bytes / 1e6:.1f} MB; "
          f"copy bandwidth {copy_bw:.2f} GB/s (read+write), read-only {read_bw:.2f} GB/s (medians)")
    print(f"{'batch':>5} {'who':<20} {'tokens/s':>9} {'x vs best transformers':>23}  tokens")
    for b in sorted(checks):
        best = min(statistics.median(v) for (name, batch), v in times.items()
                   if batch == b and name.startswith("transformers"))
        for (name, batch), values in times.items():
            if batch != b:
                continue
            seconds = statistics.median(values)
            same = first_difference(checks[b]["nanoseek"], checks[b][name]) if name != "nanoseek" else "-"
            print(f"{b:>5} {name:<20} {b * new_tokens / seconds:>9.1f} {best / seconds:>23.2f}  {same}")
            print(json.dumps({"batch": b, "who": name, "tokens_per_s": b * new_tokens / seconds, "seconds": seconds,
                              "vs_best_transformers": best / seconds, "tokens_vs_nanoseek": same,
                              "dtype": str(dtype), "compiled": compile}))
        step = statistics.median(steps[b])
        rate = weight_bytes / step / 1e9
        print(f"{b:>5} roofline: step {step * 1e3:.1f} ms, weights read at {rate:.2f} GB/s = "
              f"{100 * rate / copy_bw:.0f}% of copy bandwidth, {100 * rate / read_bw:.0f}% of read-only")
        print(json.dumps({"batch": b, "step_ms": step * 1e3, "weight_gb_per_s": rate, "copy_gb_per_s": copy_bw,
                          "read_gb_per_s": read_bw, "fraction_of_copy": rate / copy_bw}))
