"""Per-layer error budget of the GQA -> MLA attention conversion on a real model: the attention output's
relative error on calibration inputs, one layer at a time, for conversion options switched on one by one.

    python bench/convert_layer_budget.py --model /path/to/smollm2-135m-instruct --layers 3 4 14 17 20

Calibration: the first --calib-tokens tokens of `builtin:pydocs` (windows of --seq-len); the errors are measured
on those same tokens (in-sample: how well each step can fit, not held-out quality; bench/convert_real.py has the
held-out perplexities). One thread, CPU, float64.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import tyro

from nanoseek.data import load_tokenizer
from nanoseek.data.corpus import iter_documents
from nanoseek.convert.convert import _attention_error, _unit_rms, collect_inputs, target_config
from nanoseek.convert.mla import RopeChoice, convert_attention
from nanoseek.convert.rorope import convert_attention_rorope
from nanoseek.interop.source import load_source_model
from nanoseek.model import Transformer

# (label, method, rope_dims, kv_lora_rank, latent norm, weighting)
STEPS = [
    ("partial RoPE 16, R 192, norm (old default)", "partial", 16, 192, True, None),
    ("rorope 64, no truncation (R 384), no norm", "rorope", 64, 384, False, "attention"),
    ("rorope 64, R 147, no norm", "rorope", 64, 147, False, "attention"),
    ("rorope 64, R 147, norm (anchored)", "rorope", 64, 147, True, "attention"),
    ("rorope 64, R 147, norm, BKV-only weighting", "rorope", 64, 147, True, "balanced"),
    ("rorope 32, R 179, norm (anchored)", "rorope", 32, 179, True, "attention"),
    ("rorope 16, R 195, no norm", "rorope", 16, 195, False, "attention"),
]


@dataclass
class Args:
    model: str
    layers: tuple[int, ...] = (3, 4, 14, 17, 20)
    calib_tokens: int = 4096
    seq_len: int = 256


@torch.no_grad()
def main(args: Args) -> None:
    torch.set_num_threads(1)
    source = load_source_model(args.model, "--model")
    dense, src = source.model, source.model.config
    tok = load_tokenizer(source.tokenizer_dir)
    ids: list[int] = []
    for doc in iter_documents("builtin:pydocs"):
        ids += tok.encode(doc) + [tok.eos_id]
        if len(ids) >= args.calib_tokens:
            break
    calib = torch.tensor(ids[:args.calib_tokens // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    records = collect_inputs(dense, calib)
    for label, method, rope_dims, rank, norm, weighting in STEPS:
        choice = RopeChoice(0, 1, rope_dims // 2, 0.0, 0.0)  # the fastest pairs (every one at rope_dims = head_dim)
        cfg = target_config(src, rank, rope_dims, 0, 1, 2, "split", 1, choice, method, norm)
        errors = []
        for i in args.layers:
            block = dense.layers[i]
            u = _unit_rms(records[i]["resid"], src.norm_eps)
            w = [t.weight.double() for t in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo,
                                            block.attn_norm)]
            common = (*w, u.flatten(0, 1), src.n_heads, src.n_kv_heads, choice.pairs, rank, cfg.norm_eps)
            weights = (convert_attention_rorope(*common, kv_norm=norm, weighting=weighting) if method == "rorope"
                       else convert_attention(*common))
            one = Transformer(dataclasses.replace(cfg, n_layers=1, vocab_size=8)).double()
            for name in ("wq", "wkv_a", "wkv_b", "wo"):
                getattr(one.layers[0].attn, name).weight.data.copy_(getattr(weights, name))
            if norm:
                one.layers[0].attn.kv_norm.weight.data.copy_(weights.kv_norm)
            errors.append(round(_attention_error(one.layers[0].attn, u, records[i]["attn_out"]), 3))
        print(json.dumps({"step": label, "layers": list(args.layers), "attn_error": errors}), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
