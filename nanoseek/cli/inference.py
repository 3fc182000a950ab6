"""`nanoseek generate`, `eval` and `check`: using a model rather than training one.

Only the generated text goes to stdout (pipe it anywhere); what was loaded, speeds and acceptance rates go to stderr."""

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from nanoseek.check import check_presets
from nanoseek.evaluate import evaluate_ids, token_stream
from nanoseek.interop.any_model import chat_prompt, load_any_model
from nanoseek.generate import Sampling, check_prompt, generate_batch, prepare_for_generation, stream
from nanoseek.speculative import speculative_generate
from nanoseek.train.hardware import resolve_device


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _speed(n_new: int, start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{n_new} token{'s' if n_new != 1 else ''} in {seconds:.2f}s ({n_new / max(seconds, 1e-9):.1f} tokens/s)"


@dataclass
class Generate:
    """Sample text from a trained run, a checkpoint, the output of `nanoseek convert`/`heal`, a transformers
    folder or a GGUF file."""

    ckpt: str  # A run dir (best checkpoint, else latest: --which), checkpoint dir, transformers folder or .gguf file.
    prompt: str = "\n"  # The text to continue.
    prompt_file: Path | None = None
    """Read prompts from this file, one per line (blank lines skipped): one batch (one at a time with --speculative)."""
    max_new_tokens: int = 200  # Tokens per prompt (fewer at the end-of-text token or the model's context, max_seq_len).
    temperature: float = 0.8  # 0 is greedy decoding.
    top_k: int = 50  # Sample among the k most likely tokens (0: all).
    top_p: float = 1.0  # Nucleus sampling: the smallest set of tokens with this much probability (1: all).
    seed: int = 0  # Random seed of the sampler: the same seed gives the same text.
    cache: bool = True  # Decode from the KV cache (--no-cache re-runs the sequence per token: slow, for checking).
    speculative: bool = False
    """Self-speculative decoding: MTP modules draft, the model verifies (greedy; needs MTP); prints acceptance rate."""
    truncate: bool = False  # Keep the last max_seq_len - 1 tokens of a too-long prompt (otherwise that is an error).
    ema: bool = False  # Use the EMA weights when the checkpoint has them.
    which: Literal["best", "latest"] = "best"  # For a run dir: the lowest-validation-loss checkpoint, or the newest.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    stream: bool = True  # Print tokens as they are generated.
    dtype: Literal["checkpoint", "fp32", "bf16"] = "checkpoint"
    """Weights as saved, or cast (bf16 halves the bytes each token reads; fast on GPUs and CPUs with bf16 support)."""
    compile: bool = False  # Compile the decode step (torch.compile): minutes to compile on a CPU, for long generations.
    chat: bool = False  # Wrap each prompt as a user turn in the chat template (instruct models); stop at end of turn.
    system: str | None = None  # With --chat: a system message (default: the template's own, if it has one).


def _prompts(args: Generate) -> list[str]:
    if args.prompt_file is None:
        return [args.prompt]
    if not args.prompt_file.is_file():
        raise ValueError(f"--prompt-file {args.prompt_file}: no such file")
    prompts = [line for line in args.prompt_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {args.prompt_file} has no non-blank line; write one prompt per line")
    return prompts


def cmd_generate(args: Generate) -> int:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    if args.speculative and args.temperature != 0:
        raise ValueError("--speculative decodes greedily; add --temperature 0")
    device = resolve_device(args.device)
    prompts = _prompts(args)
    loaded = load_any_model(args.ckpt, device, use_ema=args.ema, which=args.which)
    model, tok = loaded.model, loaded.tokenizer
    _log(f"nanoseek generate: {loaded.label}{' (EMA weights)' if model.uses_ema else ''}, "
         f"{model.config.attention}, {model.num_params() / 1e6:.2f}M parameters, on {device}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)  # "checkpoint": as saved
    prepare_for_generation(model, dtype, pack=not args.compile)
    generator = torch.Generator().manual_seed(args.seed)
    encoded = []  # each prompt's ids, and the ids that end its continuation
    for text in prompts:
        ids, stops = chat_prompt(loaded.tokenizer_dir, text, args.system) if args.chat else (tok.encode(text), [])
        encoded.append((ids, {tok.eos_id, *stops}))
    if len(prompts) > 1 and not args.speculative:
        return _generate_batch(model, tok, prompts, encoded, args, sampling, generator)
    for text, (ids, stops) in zip(prompts, encoded):
        prompt = check_prompt(model, torch.tensor([ids], device=device), args.truncate)
        start, n_new = time.perf_counter(), 0
        sys.stdout.write(text + ("\n" if args.chat else ""))
        if args.speculative:
            tokens, stats = speculative_generate(model, prompt, args.max_new_tokens, tok.eos_id)
            new = tokens[0, prompt.shape[1]:].tolist()
            n_new = len(new)
            sys.stdout.write(tok.decode([t for t in new if t != tok.eos_id]))
            _log(f"speculative: {stats.accepted}/{stats.drafted} drafts accepted "
                 f"({100 * stats.acceptance_rate:.1f}%), {stats.tokens_per_pass:.2f} tokens per model pass")
        else:
            new, written = [], 0
            for nxt in stream(model, prompt, args.max_new_tokens, sampling, tok.eos_id, generator,
                              use_cache=args.cache, compile=args.compile):
                n_new += 1
                if int(nxt[0, 0]) in stops:
                    break
                new.append(int(nxt[0, 0]))
                if args.stream:  # a trailing U+FFFD is half of a multi-byte character: held back until the end
                    written = _write_new(tok.decode(new).rstrip("\ufffd"), written)
            _write_new(tok.decode(new), written)
        sys.stdout.write("\n")
        sys.stdout.flush()
        _log(_speed(n_new, start))
    return 0


def _generate_batch(model, tok, prompts: list[str], encoded: list, args: Generate, sampling, generator) -> int:
    """Every prompt of --prompt-file in one left-padded batch; each printed with its continuation, in order."""
    if not args.cache:
        raise ValueError("--prompt-file decodes its prompts as one batch from the cache; drop --no-cache")
    start = time.perf_counter()
    rows = generate_batch(model, [ids for ids, _ in encoded], args.max_new_tokens, sampling, tok.eos_id, generator,
                          args.truncate, args.compile)
    for text, row, (_, stops) in zip(prompts, rows, encoded):
        end = next((i for i, t in enumerate(row) if t in stops), len(row))  # a chat row ends at its end of turn
        sys.stdout.write(text + ("\n" if args.chat else "") + tok.decode(row[:end]) + "\n")
    sys.stdout.flush()
    _log(f"{len(prompts)} prompts in one batch: {_speed(sum(len(row) for row in rows), start)}")
    return 0


def _write_new(text: str, written: int) -> int:
    """Write what `text`, the decoded continuation so far, adds past the `written` characters already out."""
    sys.stdout.write(text[written:])
    sys.stdout.flush()
    return max(written, len(text))


@dataclass
class Eval:
    """Validation loss, perplexity and bits per byte of a trained model on held-out text."""

    ckpt: str  # A run dir (best checkpoint, else latest: --which), checkpoint dir, transformers folder or .gguf file.
    data: str | None = None
    """Text to score: anything `train --data` accepts, or a prepared directory (its validation split). Default: the
    run's own validation split (required for a transformers folder or GGUF file)."""
    seq_len: int | None = None  # Window length (default: the model's max_seq_len).
    batch_size: int = 8
    max_tokens: int | None = None  # Score at most this many tokens (default: all).
    ema: bool = True  # Use the EMA weights when the checkpoint has them (--no-ema for the raw weights).
    which: Literal["best", "latest"] = "best"  # For a run dir: the lowest-validation-loss checkpoint, or the newest.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    json: bool = False  # Print the result as one JSON object.


def cmd_eval(args: Eval) -> int:
    loaded = load_any_model(args.ckpt, resolve_device(args.device), use_ema=args.ema, which=args.which)
    model, tok = loaded.model, loaded.tokenizer
    if args.data is None and loaded.run_dir is None:
        raise ValueError(f"--ckpt {args.ckpt} is not a nanoseek run, so it has no validation split: pass --data "
                         "(a file, directory, glob, builtin:pydocs or hf:NAME)")
    ids = token_stream(args.data, tok, loaded.run_dir / "data" if loaded.run_dir else None, args.max_tokens)
    result = evaluate_ids(model, tok, ids, args.seq_len, args.batch_size,
                          torch.bfloat16 if args.precision == "bf16" else None, progress=True)
    source, weights = args.data or "the run's validation split", "EMA" if model.uses_ema else "raw"
    if args.json:
        print(json.dumps({"checkpoint": str(model.checkpoint_path), "data": source, "weights": weights,
                          **asdict(result)}))
    else:
        _log(f"nanoseek eval: {loaded.label} ({weights} weights) on {source}")
        print(result.line())
    return 0


@dataclass
class Check:
    """Build every preset at tiny width and run forward, backward and 20 decoded tokens; pass/fail per preset."""

    presets: tuple[str, ...] = ()  # Presets to check (default: all).
    device: Literal["auto", "cpu", "cuda"] = "cpu"


def cmd_check(args: Check) -> int:
    results = check_presets(list(args.presets) or None, resolve_device(args.device))
    print(f"{'preset':<20} {'':<5} {'params':>9} {'time':>7}  detail")
    print("\n".join(result.row() for result in results))
    failed = [r.preset for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} presets pass"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
