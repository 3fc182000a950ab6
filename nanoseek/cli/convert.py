"""`nanoseek convert` and `nanoseek heal`: the command-line side of convert/convert.py and convert/heal.py.

A converted model is a nanoseek run directory, so every other command reads it: config.toml, data/ (the source's
tokenizer, the text tokenised into train/val shards), checkpoints/step-00000000/ (the converted weights) and
conversion.json (the source, the options and the ConversionReport)."""

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import tyro

from nanoseek.config import DataConfig, GuardConfig, RunConfig, TrainConfig
from nanoseek.convert.convert import convert_to_mla_moe, target_config
from nanoseek.convert.heal import heal
from nanoseek.data import is_prepared_dir, load_prepared, prepare_data, read_tokens
from nanoseek.interop.any_model import copy_chat_files
from nanoseek.interop.source import load_source_model
from nanoseek.rundir import hold
from nanoseek.train.checkpoint import latest_checkpoint, save_checkpoint
from nanoseek.train.distributed import launched_by_torchrun
from nanoseek.train.loading import load_model, run_dir_of
from nanoseek.train.resume import refuse_foreign_files

CONVERSION_FILE = "conversion.json"


@dataclass
class Convert:
    """Convert a dense Llama-style model (GQA/MHA/MQA) into DeepSeek's MLA, and its MLPs into DeepSeekMoE;
    report per-layer approximation errors, initial expert loads and the held-out KL / perplexity."""

    from_: Annotated[str, tyro.conf.arg(name="from")]
    """A transformers folder (config.json + safetensors + tokenizer.json, e.g. SmolLM2-135M), a .gguf file
    (needs `pip install 'nanoseek[gguf]'`) or a nanoseek GQA run / checkpoint directory."""
    out: str  # Run directory to write (generate, eval, export and heal read it).
    to: Literal["mla-moe", "mla"] = "mla-moe"
    """mla-moe: MLA attention and MoE MLPs (after --dense-layers); mla: MLA attention, MLPs kept dense."""
    kv_lora_rank: int | None = None
    """Latent rank (default n_kv_heads * head_dim: half of GQA's K+V cache). >= dim is exact for MQA."""
    rope_dims: int | None = None
    """Width of the shared rope key (even): the RoPE frequencies kept (default: every one, head_dim, with
    --method rorope; head_dim / 4 with --method partial)."""
    experts: int = 7  # Routed experts per MoE layer.
    shared: int = 1  # Shared (always-on) experts per MoE layer.
    top_k: int = 2  # Routed experts active per token.
    moe: Literal["split", "upcycle"] = "split"
    """split: partition the MLP's neurons into shared + routed experts (inter_dim / (shared + experts) each);
    upcycle: every expert a copy of the MLP (exact for any routing, more parameters)."""
    dense_layers: int = 1  # The first layers keep their dense MLP (DeepSeek's first_k_dense_replace).
    router_std: float = 0.02  # Spread of the initial router logits (small: top-k weights stay ~equal).
    method: Literal["rorope", "partial"] = "rorope"
    """rorope: per kept RoPE frequency the KV groups' principal component is the shared rope key, the rest of every
    key NoPE (TransMLA's RoRoPE; heads D + Dr wide); partial: MHA2MLA's partial RoPE, the others unrotated (D wide)."""
    kv_latent_norm: bool = True
    """Keep the RMSNorm on the KV latent (transformers' DeepseekV3 always has one; --no-kv-latent-norm is closer
    to the original in nanoseek, and its export then adds the norm back with a constant weight)."""
    latent_init: Literal["activations", "weights"] = "activations"
    """--method partial, below full rank: SVD of K/V projections weighted by calibration inputs, or of bare weights."""
    data: str = "builtin:pydocs"
    """Text for calibration (its train split) and the held-out report (its val split); any `train --data` form
    (a prepared directory must have been tokenised with the model's tokenizer)."""
    seq_len: int = 256  # Sequence length of calibration / held-out windows (and of `heal`'s training data).
    calib_tokens: int = 4096  # Calibration tokens.
    eval_tokens: int = 4096  # Held-out tokens for the KL / perplexity report.
    seed: int = 0  # Seed of the expert clustering and the upcycled router.


@dataclass
class Heal:
    """Distil the original model into a converted one (KL on logits, optionally hidden states) with the usual
    trainer and stability guard; report KL and perplexity on held-out text before and after."""

    ckpt: str  # The converted run directory (written by `nanoseek convert`) or one of its checkpoints.
    out: str | None = None  # Run directory for the healed model (default: CKPT-healed).
    teacher: str | None = None  # The original model (default: the conversion's source, from conversion.json).
    steps: int | None = None  # Training steps (shortcut for --train.max-steps).
    data: str | None = None  # Training text (default: the converted run's prepared data).
    seq_len: int | None = None  # Training sequence length (default: the conversion's --seq-len).
    temperature: float = 1.0  # Distillation temperature (the KL is scaled by T^2).
    hidden_weight: float = 0.0
    """Weight of the per-layer hidden-state MSE (normalised by the teacher's mean square); 0 = logits only."""
    ce_weight: float = 0.0  # Weight of a next-token cross-entropy term on the data.
    train_router: bool = False  # Train the MoE routers too (default: as the conversion fitted them, convert/heal.py).
    eval_tokens: int = 4096  # Held-out tokens (the converted run's val split) for the before/after report.
    device: Literal["auto", "cpu", "cuda"] = "auto"  # Where to train (auto: cuda if available).
    seed: int = 1337  # Random seed (data order).
    progress: bool = True  # Show a progress bar.
    train: TrainConfig = field(default_factory=partial(TrainConfig, max_steps=200, lr=1e-4, warmup_steps=10,
                                                       weight_decay=0.0, batch_size=8, eval_every=50, save_every=100,
                                                       eval_batches=4, sample_tokens=0))
    guard: GuardConfig = field(default_factory=GuardConfig)


def load_source(path: str | Path, flag: str = "--from"):
    """(dense model, tokenizer spec for DataConfig.tokenizer, tokenizer folder); a char tokenizer is refused."""
    source = load_source_model(path, flag)
    if source.tokenizer == "char":
        raise ValueError(f"the run at {path} uses a 'char' tokenizer; convert needs a tokenizer.json or byte one")
    return source.model, source.tokenizer, source.tokenizer_dir


def _split_ids(data_dir: Path, split: str, n_tokens: int) -> np.ndarray:
    prepared = load_prepared(data_dir)
    return read_tokens(prepared.train_shards if split == "train" else prepared.val_shards, n_tokens)


def _windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(ids)} calibration tokens for seq_len={seq_len}; give more text or lower --seq-len")
    return torch.from_numpy(ids[:n * seq_len].reshape(n, seq_len))


def cmd_convert(args: Convert) -> int:
    out = Path(args.out)
    hold(out, "convert")
    if latest_checkpoint(out) is not None:
        raise ValueError(f"--out {out} already holds checkpoints; choose a new directory")
    refuse_foreign_files(out)  # someone's other files: refused before anything is written
    dense, tokenizer_spec, tokenizer_dir = load_source(args.from_)
    src = dense.config
    if src.attention != "gqa":  # before the defaults below, which read GQA fields; target_config checks the rest
        raise ValueError(f"--from {args.from_}: attention={src.attention!r}; convert takes a dense GQA/MHA/MQA model")
    # None is the default; an explicit 0 reaches target_config, which refuses it by name.
    kv_rank = args.kv_lora_rank if args.kv_lora_rank is not None else src.n_kv_heads * src.head_dim
    rope_dims = args.rope_dims if args.rope_dims is not None else (
        src.head_dim if args.method == "rorope" else max(2, src.head_dim // 4 // 2 * 2))
    experts = args.experts if args.to == "mla-moe" else 0
    options = dict(kv_lora_rank=kv_rank, rope_dims=rope_dims, n_routed_experts=experts, n_shared_experts=args.shared,
                   n_activated_experts=args.top_k, moe=args.moe, n_dense_layers=args.dense_layers,
                   method=args.method, kv_latent_norm=args.kv_latent_norm)
    target_config(src, **options)  # a bad source (QK-norm, YaRN, MoE) or option fails before the data is tokenised
    seq_len = min(args.seq_len, src.max_seq_len)
    if args.calib_tokens < seq_len or args.eval_tokens < 2:
        raise ValueError(f"--calib-tokens {args.calib_tokens} / --eval-tokens {args.eval_tokens}: calibration needs "
                         f"at least one window of --seq-len {seq_len} tokens, the held-out report at least 2 tokens")
    data_cfg = DataConfig(source=args.data, tokenizer=tokenizer_spec, seq_len=seq_len)
    if is_prepared_dir(args.data):  # already tokenised (with the model's tokenizer): copy it in
        shutil.copytree(args.data, out / "data", dirs_exist_ok=True)
        data_cfg = dataclasses.replace(data_cfg, source=str(out / "data"))
    prepared = prepare_data(data_cfg, out / "data")
    copy_chat_files(tokenizer_dir, out / "data")  # `generate --chat` on the converted run uses the same template
    if prepared.vocab_size > src.vocab_size:
        raise ValueError(f"the tokenizer has {prepared.vocab_size} ids but the model only {src.vocab_size}; "
                         "pass the model's own tokenizer")
    calib = _windows(_split_ids(out / "data", "train", args.calib_tokens), seq_len)
    held_out = torch.from_numpy(_split_ids(out / "data", "val", args.eval_tokens))
    torch.manual_seed(args.seed)
    print(f"nanoseek convert: {args.from_} ({src.n_layers} layers, {src.n_heads} heads, {src.n_kv_heads} KV heads, "
          f"head_dim {src.head_dim}) -> {args.to}; {calib.numel()} calibration, {held_out.numel()} held-out tokens",
          file=sys.stderr)
    model, report = convert_to_mla_moe(dense, calib, **options, router_std=args.router_std,
                                       latent_init=args.latent_init, eval_ids=held_out, seed=args.seed)
    run_cfg = RunConfig(model=model.config, data=data_cfg, preset="converted", out=str(out), seed=args.seed)
    run_cfg.save_toml(out / "config.toml")
    save_checkpoint(out, 0, model.state_dict(), {}, run_cfg.to_dict())
    record = {"source": str(Path(args.from_).expanduser().resolve()), "options": dataclasses.asdict(args),
              "report": report.as_dict()}
    (out / CONVERSION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    c = report.comparison
    print(f"converted: KL {c['kl']:.4f} nats/token, perplexity {c['ppl_teacher']:.3f} -> {c['ppl_student']:.3f}, "
          f"KV cache {report.cache_change()}; saved to {out} (next: nanoseek heal --ckpt {out})")
    return 0


def cmd_heal(args: Heal) -> int:
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise ValueError(f"--ckpt {ckpt}: does not exist; pass the run directory `nanoseek convert` wrote")
    run = run_dir_of(ckpt) or ckpt
    record_path = run / CONVERSION_FILE
    teacher_path = args.teacher or (json.loads(record_path.read_text()) if record_path.is_file() else {}).get("source")
    if teacher_path is None:
        raise ValueError(f"{run} has no {CONVERSION_FILE}; pass --teacher (the original model)")
    student, cfg = load_model(ckpt)
    teacher, _, _ = load_source(teacher_path, "--teacher")
    if teacher.config.vocab_size != cfg.vocab_size:
        raise ValueError(f"--teacher {teacher_path} has vocab_size {teacher.config.vocab_size}, the converted model "
                         f"{cfg.vocab_size}; pass the model it was converted from")
    out = Path(args.out or f"{run}-healed")
    base = RunConfig.load_toml(run / "config.toml")
    writer = launched_by_torchrun()[0] == 0  # under torchrun, rank 0 alone writes and reports
    if writer:  # one writer per run directory; checked before data is copied in
        hold(out, "heal")
        refuse_foreign_files(out)
    data = args.data
    if data is None:  # train on the conversion's own shards, copied so the healed run is self-contained
        if not (out / "data" / "meta.json").is_file():
            shutil.copytree(run / "data", out / "data", dirs_exist_ok=True)
        data = str(out / "data")
    seq_len = args.seq_len if args.seq_len is not None else base.data.seq_len
    data_cfg = dataclasses.replace(base.data, source=data, seq_len=seq_len)
    train = dataclasses.replace(args.train, max_steps=args.steps) if args.steps is not None else args.train
    run_cfg = RunConfig(model=cfg, data=data_cfg, train=train, guard=args.guard, preset=base.preset, out=str(out),
                        seed=args.seed, device=args.device)
    held_out = torch.from_numpy(_split_ids(run / "data", "val", args.eval_tokens))
    result = heal(student, teacher, run_cfg, out, held_out, args.temperature, args.hidden_weight, args.ce_weight,
                  show_progress=args.progress, train_router=args.train_router)
    if writer:
        (out / "heal.json").write_text(json.dumps({"teacher": str(teacher_path), **result.as_dict()}, indent=1) + "\n")
        print(f"before heal: {result.before.line()}")
        print(f"after heal ({result.steps} steps, {result.status}): {result.after.line()}")
        print(f"healed model saved in {out}")
    return 3 if result.status == "aborted" else 0
