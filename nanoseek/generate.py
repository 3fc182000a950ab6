"""Sampling: prefill once, then decode one token at a time from the KV cache (the latent cache for MLA).

The end-of-text check reads the device only every `sync_every` tokens, so a GPU keeps decoding ahead of
Python. The default cache is static (model/cache.py): every decode step has the same shapes, so `compile`
traces it once; the dynamic cache (`static_cache=False`) is the simpler reference."""

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanoseek.model import Transformer, eval_mode
from nanoseek.model.cache import new_static_caches
from nanoseek.model.packed import fuse_linears, pack_linears


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 keeps every token)")


GREEDY = Sampling(temperature=0.0)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, vocab] -> next token ids [B, 1]. temperature 0 is greedy."""
    logits = logits.float()  # exact for bf16/fp16, and CPU's fp32 argmax is faster (bench_decode_overhead.py)
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus sampling (Holtzman et al. 2019): smallest set with mass >= top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        # A CPU generator drives the draw on any device, so a seed gives the same text everywhere.
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


def prepare_for_generation(model: Transformer, dtype: torch.dtype | None = None, pack: bool = True) -> int:
    """Ready `model` for decoding alone, in place: eval mode, weights in `dtype` (None: as they are) and, on CPU,
    linear layers prepacked for oneDNN, those reading the same input stacked into one (model/packed.py); returns
    how many are packed. Leave `pack` off for a compiled step: inductor's weight freezing packs them itself."""
    model.eval()
    if dtype is not None:
        model.to(dtype)
    # fuse first: the parts it stacks are plain nn.Linear until pack_linears runs
    return fuse_linears(model) + pack_linears(model) if pack else 0


def check_prompt(model: Transformer, prompt: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """The prompt as the model can take it: [B, T0] with T0 < max_seq_len (room for one new token).
    A longer prompt is an error unless `truncate`, which keeps its last max_seq_len - 1 tokens."""
    limit = model.config.max_seq_len - 1
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty; pass at least one token (any text, or a newline)")
    if prompt.shape[1] > limit and not truncate:
        raise ValueError(f"the prompt has {prompt.shape[1]} tokens but the model's context is "
                         f"{model.config.max_seq_len} (max_seq_len); shorten it, or pass --truncate to keep "
                         f"its last {limit} tokens")
    return prompt[:, -limit:]


class StaticDecoder:
    """Prefill, then one-token steps over static caches. pad: [B] left-padding length of each row (None: none).
    `compile` compiles the step with static shapes and frozen weights: one trace per batch size and length."""

    def __init__(self, model: Transformer, batch: int, max_len: int, pad: torch.Tensor | None = None,
                 compile: bool = False):
        self.model = model
        self.layout, self.caches = new_static_caches(model, batch, max_len, pad)
        self._step = compiled_step() if compile else decode_step

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """prompt [B, T0] (left-padded as `pad` says) -> logits of the next token [B, vocab]."""
        self.layout.advance(0, prompt.shape[1])
        return self.model(prompt, caches=self.caches).logits[:, -1]

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens [B, 1] written at cache slot `slot` -> logits of the next token [B, vocab]."""
        return self._step(self.model, self.layout, self.caches, tokens, torch.tensor(slot, device=tokens.device))


def decode_step(model: Transformer, layout, caches: list, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """One token per row at cache slot `slot` (a 0-dim tensor: a compiled step never sees a new constant)."""
    layout.advance(slot, 1)
    return model(tokens, caches=caches, start_pos=slot).logits[:, -1]


@functools.cache
def compiled_step():
    """decode_step under torch.compile, made once per process. Freezing bakes the weights in as constants:
    compile only a model whose weights no longer change (not sampling between training steps)."""
    options = {"freezing": True} if torch.backends.mkldnn.is_available() else None
    return torch.compile(decode_step, dynamic=False, options=options)


def _first_and_next(model: Transformer, prompt: torch.Tensor, total: int, pad: torch.Tensor | None,
                    use_cache: bool, static_cache: bool, compile: bool):
    """(logits after the prompt [B, vocab], next(tokens [B, 1], position) -> logits) for the chosen cache."""
    if use_cache and static_cache:
        decoder = StaticDecoder(model, prompt.shape[0], total, pad, compile)
        return decoder.prefill(prompt), decoder.step
    if pad is not None:
        raise ValueError("a ragged (left-padded) batch decodes from the static cache; leave use_cache and "
                         "static_cache on, or decode its prompts one at a time")
    if use_cache:
        caches = model.new_caches(prompt.shape[0], total)
        return (model(prompt, caches=caches).logits[:, -1],
                lambda nxt, pos: model(nxt, caches=caches, start_pos=pos).logits[:, -1])
    seq = [prompt]  # no cache: re-run the whole sequence for every token (the slow reference path)

    def rerun(nxt: torch.Tensor, pos: int) -> torch.Tensor:
        seq[0] = torch.cat([seq[0], nxt], dim=1)
        return model(seq[0]).logits[:, -1]
    return model(prompt).logits[:, -1], rerun


@torch.no_grad()
def stream(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
           eos_id: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
           truncate: bool = False, sync_every: int = 16, pad: torch.Tensor | None = None,
           static_cache: bool = True, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield new tokens [B, 1] one at a time (at most max_new_tokens, never past max_seq_len).

    pad: [B] left-padding length of each row of `prompt` (see `pad_prompts`). Rows that emitted eos_id keep
    emitting it; the stream ends once every row has (checked every `sync_every` tokens, or every token for a
    batch of one, which is synchronous anyway)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    with eval_mode(model):
        full_len = prompt.shape[1]
        prompt = check_prompt(model, prompt, truncate)
        batch, length = prompt.shape
        if pad is not None:  # truncation cuts padding first
            pad = (pad - (full_len - length)).clamp(min=0)
        total = min(model.config.max_seq_len, length + max_new_tokens)
        logits, step = _first_and_next(model, prompt, total, pad, use_cache, static_cache, compile)
        done = torch.zeros(batch, 1, dtype=torch.bool, device=prompt.device)
        for pos in range(length, total):  # pos: the position of the token drawn now
            nxt = sample_next(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)  # [B, 1]
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            yield nxt
            checked = eos_id is not None and (batch == 1 or (pos + 1 - length) % sync_every == 0)
            if pos + 1 >= total or (checked and bool(done.all())):
                break
            logits = step(nxt, pos)


def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
             truncate: bool = False, pad: torch.Tensor | None = None, static_cache: bool = True,
             compile: bool = False) -> torch.Tensor:
    """prompt: [B, T0] -> [B, T0 + n], n <= max_new_tokens (fewer at eos or at max_seq_len).
    With truncate, T0 counts the prompt as the model saw it. pad, static_cache, compile: as for `stream`."""
    seen = check_prompt(model, prompt, truncate)  # the prompt as the model sees it
    new = list(stream(model, prompt, max_new_tokens, sampling, eos_id, generator, use_cache, truncate, pad=pad,
                      static_cache=static_cache, compile=compile))
    out = torch.cat([seen, *new], dim=1)
    if eos_id is not None and new:  # drop trailing all-eos columns the periodic check let through
        all_done = ((out[:, seen.shape[1]:] == eos_id).cumsum(1) > 0).all(0)  # [n]: every row at/after its eos
        if bool(all_done.any()):
            out = out[:, :seen.shape[1] + int(all_done.int().argmax()) + 1]
    return out


def pad_prompts(prompts: list[list[int]], pad_id: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of any lengths -> (left-padded batch [B, T0], pad [B]); the pad token is never attended."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt or an empty list was given)")
    width = max(len(p) for p in prompts)
    batch = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    return batch, torch.tensor([width - len(p) for p in prompts], device=device)


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                   eos_id: int | None = None, generator: torch.Generator | None = None, truncate: bool = False,
                   compile: bool = False) -> list[list[int]]:
    """Continue every prompt in one batch (no loop over prompts): each row's new tokens, cut after its first
    eos_id (kept). Greedy rows equal what `generate` gives that prompt alone. The rows share one context of
    max_seq_len slots, so the longest prompt bounds how many tokens every row can get."""
    batch, pad = pad_prompts(prompts, device=model.embed.weight.device)
    out = generate(model, batch, max_new_tokens, sampling, eos_id, generator, truncate=truncate, pad=pad,
                   compile=compile)
    rows = out[:, min(batch.shape[1], model.config.max_seq_len - 1):].tolist()
    if eos_id is not None:
        rows = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows
