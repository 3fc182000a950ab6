"""How far bf16 greedy decoding drifts from fp32, for nanoseek and for transformers, on a real model.

    python bench/decode_bf16_drift.py /path/to/smollm2-135m-instruct               # 8 prompts, 64 tokens
    python bench/decode_bf16_drift.py /path/to/smollm2-135m-instruct --fp32-rope    # transformers' RoPE in fp32

Both libraries load the folder in fp32 and in bf16 (bench/decode_real.py's `load`; nanoseek prepared for
generation). The fp32 greedy tokens of the two are checked equal; then, per prompt of decode_real.PROMPTS:
  - the first new token at which each library's bf16 greedy tokens leave the fp32 ones (64: never);
  - with the fp32 tokens forced in, the mean |bf16 logit - fp32 logit| of each library.
`--fp32-rope` makes transformers' Llama rotary compute cos/sin and the rotation in fp32, rounded once, as
nanoseek does, to see whether RoPE rounding alone is what separates the two libraries' bf16 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tyro
from decode_real import PROMPTS, load

from nanoseek.generate import GREEDY, stream


@dataclass
class Args:
    folder: tyro.conf.Positional[str]
    new_tokens: int = 64
    fp32_rope: bool = False


def fp32_rope() -> None:
    import transformers.models.llama.modeling_llama as llama

    forward = llama.LlamaRotaryEmbedding.forward

    def tables(self, x, position_ids):  # cos/sin left in fp32
        return forward(self, x.float(), position_ids)

    def rotate(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return tuple((t.float() * cos + llama.rotate_half(t.float()) * sin).to(t.dtype) for t in (q, k))

    llama.LlamaRotaryEmbedding.forward = tables
    llama.apply_rotary_pos_emb = rotate


def main(args: Args) -> None:
    torch.set_num_threads(1)
    if args.fp32_rope:
        fp32_rope()
    tokenizer, ref32, ours32, _ = load(args.folder, torch.float32, False)
    _, ref16, ours16, _ = load(args.folder, torch.bfloat16, False)

    def ours(model, ids):
        return torch.cat(list(stream(model, ids, args.new_tokens, GREEDY)), 1)

    def theirs(model, ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        return out[:, ids.shape[1]:]

    def first_difference(a, b) -> int:
        differ = (a != b).nonzero()
        return args.new_tokens if len(differ) == 0 else int(differ[0, -1])

    rows = {"nanoseek": ([], []), "transformers": ([], [])}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        gold = ours(ours32, ids)
        assert torch.equal(gold, theirs(ref32, ids)), "the fp32 greedy tokens differ between the two"
        seq = torch.cat([ids, gold], 1)
        with torch.no_grad():
            exact = ref32(seq).logits.float()
            for name, model, decode in (("nanoseek", ours16, ours), ("transformers", ref16, theirs)):
                rows[name][0].append(first_difference(decode(model, ids), gold))
                rows[name][1].append((model(seq).logits.float() - exact).abs().mean().item())
    for name, (firsts, errors) in rows.items():
        print(f"{name:12s} first token off fp32 greedy {firsts}; mean |logit - fp32| {[round(e, 3) for e in errors]} "
              f"(mean {sum(errors) / len(errors):.3f})")


if __name__ == "__main__":
    main(tyro.cli(Args))
