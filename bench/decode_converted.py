"""Decoding a converted real model: the absorbed MLA latent-cache path and MTP self-speculative decoding.

    python bench/bench_decode.py --converted RUN --dtype bfloat16     # RUN: `nanoseek convert --to mla` output

Quality is irrelevant here (no healing), only speed. Rows, greedy, `new_tokens` after 19-token prompts
(random ids; equal lengths, as the dynamic cache takes no ragged batch):
- mla-dynamic: the model as loaded, dynamic latent cache (the previous decoding path);
- mla-static: prepare_for_generation (linears prepacked on CPU) and the static latent cache;
- mla-mtp-speculative (batch 1): one MTP module added (random: drafts are rarely accepted, so this measures
  the cost of a round) and speculative_generate; greedy tokens must equal mla-static's.
Interleaved in a rotating order, medians over repeats.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import torch

from nanoseek.generate import GREEDY, generate, prepare_for_generation
from nanoseek.model import Transformer
from nanoseek.speculative import speculative_generate
from nanoseek.train.loading import load_model


def load(run: str, dtype: torch.dtype) -> tuple[Transformer, Transformer, Transformer]:
    """(as loaded, prepared, prepared with one MTP module) in dtype."""
    plain, cfg = load_model(run)
    plain = plain.to(dtype).eval()
    fast = Transformer(cfg).to(dtype)
    fast.load_state_dict(plain.state_dict())
    prepare_for_generation(fast)
    torch.manual_seed(0)
    drafting = Transformer(dataclasses.replace(cfg, mtp_depth=1, mtp_kind="modules")).to(dtype)
    missing, unexpected = drafting.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("mtp.") for name in missing), (missing, unexpected)
    prepare_for_generation(drafting)
    return plain, fast, drafting


def compare(run: str, dtype: torch.dtype, batch_sizes: tuple[int, ...], new_tokens: int, repeats: int) -> None:
    torch.set_num_threads(1)
    plain, fast, drafting = load(run, dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, plain.config.vocab_size, (b, 19), generator=gen).tolist() for b in batch_sizes}

    def greedy(model, b, n, static=True):
        return generate(model, torch.tensor(prompts[b]), n, GREEDY, static_cache=static)

    runners = {"mla-dynamic": lambda b, n: greedy(plain, b, n, static=False),
               "mla-static": lambda b, n: greedy(fast, b, n)}
    cases = [(name, b) for b in batch_sizes for name in runners]
    if 1 in batch_sizes:
        runners["mla-mtp-speculative"] = lambda b, n: speculative_generate(drafting, torch.tensor([prompts[1][0]]), n)
        cases.append(("mla-mtp-speculative", 1))
    for name, b in cases:
        runners[name](b, 4)  # warm-up
    times, outputs = {}, {}
    for r in range(repeats):
        for name, b in cases[r % len(cases):] + cases[:r % len(cases)]:
            start = time.perf_counter()
            outputs[(name, b)] = runners[name](b, new_tokens)
            times.setdefault((name, b), []).append(time.perf_counter() - start)
    print(f"# converted MLA ({plain.config.kv_lora_rank}+{plain.config.qk_rope_head_dim} cached values per "
          f"token and layer), {dtype}, {new_tokens} new tokens, greedy, medians of {repeats}")
    for (name, b), values in times.items():
        out = outputs[(name, b)]
        extra = {}
        if name == "mla-mtp-speculative":
            tokens, stats = out
            extra = {"acceptance": stats.acceptance_rate, "tokens_per_pass": stats.tokens_per_pass,
                     "same_tokens_as_static": torch.equal(tokens[0, :len(prompts[1][0]) + new_tokens],
                                                          outputs[("mla-static", 1)][0])}
        elif name != "mla-static":
            extra = {"same_tokens_as_static": torch.equal(out, outputs[("mla-static", b)])}
        rate = b * new_tokens / statistics.median(values)
        print(f"{name:<22} batch {b}: {rate:7.1f} tokens/s {extra}")
        print(json.dumps({"who": name, "batch": b, "tokens_per_s": rate, "dtype": str(dtype), **extra}))
