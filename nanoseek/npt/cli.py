"""`nanoseek npt`: train NPT adapters on a frozen base model against the base as teacher.

The run directory is an ordinary nanoseek run (checkpoints/ hold the student: base weights plus adapters; data/ the
base's tokenizer), so the guard, resume, metrics, `generate --ckpt RUN` and `eval --ckpt RUN` all apply. In addition
npt.json holds the adapter layout and distillation settings (what --resume rebuilds), adapters/ the adapters alone."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from nanoseek.config import DataConfig, GuardConfig, RunConfig, TrainConfig, require_non_negative, require_positive
from nanoseek.data import is_prepared_dir, load_prepared
from nanoseek.interop.source import SourceModel, load_source_model
from nanoseek.model import Transformer
from nanoseek.npt import (AdapterConfig, DistillationObjective, NPTBlock, Teacher, convert_to_npt, parse_layers,
                          save_adapters)
from nanoseek.npt.config import DEFAULT_RANK
from nanoseek.npt.quantize import check_quantization, quantize_base
from nanoseek.rundir import hold, unique_run_dir
from nanoseek.train.distributed import launched_by_torchrun
from nanoseek.train.hardware import resolve_device
from nanoseek.train.trainer import Trainer

RUN_FILE = "npt.json"


@dataclass
class Npt:
    """Train NPT adapters (attention drives a bounded modulation of the MLP gate) on a frozen base model,
    with the base itself as teacher. Only adapter parameters train."""

    base: str  # The frozen base: a nanoseek run/checkpoint dir, or a transformers Llama folder (with tokenizer.json).
    out: str | None = None  # Run directory (default: runs/npt-TIMESTAMP).
    layers: str = "upper"
    """Layers to convert: 'upper' (upper half of the dense-MLP layers), 'all', or ids/ranges like '2,3' or '1-3'."""
    rank: int = DEFAULT_RANK  # Rank of the adapter's projection of the attention output.
    safe_mode: bool = False  # Additive gate modulation only (no multiplicative path): the most conservative adapter.
    reg_weight: float = 0.01  # lambda: weight of the penalty on the adapters' raw outputs.
    kl_weight: float = 0.0  # Weight of KL(teacher || student) on the next-token distributions (0: hidden states only).
    data: str | None = None
    """Text to distil on (anything `train --data` takes). Default: the built-in corpus (builtin:pydocs) tokenised
    with the base's tokenizer (for a base with a char tokenizer: the base run's own prepared data)."""
    seq_len: int = 128  # Tokens per sequence (capped at the base's max_seq_len).
    batch_size: int = 8
    max_steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    grad_clip: float = 0.5  # Adapter gradient clip (small adapters on a frozen model need a tight one); 0 disables it.
    eval_every: int = 50
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # Autocast precision; must stay fp32 with --quantize.
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base quantised with bitsandbytes (CUDA only; compute stays fp32)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1337
    inject: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Fault injection, as for `train`, repeatable (e.g. --inject inf-act:layers.3.adapter@5 --inject nan-grad@7)."""
    resume: bool = False  # Continue the run in --out from its latest complete checkpoint.
    progress: bool = True

    def __post_init__(self) -> None:
        if self.quantize != "none" and self.precision != "fp32":
            raise ValueError(f"precision={self.precision!r} with quantize={self.quantize!r}: a quantised base computes "
                             "in fp32 (mixed precision over quantised weights produces NaNs); drop --precision "
                             "or --quantize")
        require_positive(self, "rank", "seq_len", "batch_size", "max_steps", "eval_every", "lr")
        require_non_negative(self, "reg_weight", "kl_weight", "grad_clip", "warmup_steps")
        if self.resume and not self.out:
            raise ValueError("--resume needs --out RUN_DIR: the NPT run to continue")


@dataclass
class NptResult:
    initial_loss: float | None  # validation distillation loss before the first step (None on resume)
    final_loss: float | None
    status: str
    model: Transformer  # the trained student: the base with NPT blocks
    teacher: Teacher


def _layout(args: Npt, run_dir: Path, student: Transformer) -> tuple[AdapterConfig, float, float]:
    """(adapter layout, reg_weight, kl_weight): from the flags, or on --resume from the run's npt.json (the
    layout and loss the checkpoints were written with, whatever the flags say now)."""
    if args.resume:
        if not (run_dir / RUN_FILE).is_file():
            raise ValueError(f"--resume: {run_dir} has no {RUN_FILE}; it is not an `nanoseek npt` run")
        record = json.loads((run_dir / RUN_FILE).read_text())
        return AdapterConfig.from_dict(record["adapters"]), record["reg_weight"], record["kl_weight"]
    return AdapterConfig(parse_layers(args.layers, student), args.rank, args.safe_mode), args.reg_weight, args.kl_weight


def _run_config(args: Npt, base: SourceModel, student: Transformer, run_dir: Path) -> tuple[RunConfig, bool]:
    """The run's config, and whether its data is a prepared directory (tokenised already)."""
    source = args.data or (str(base.prepared_data) if base.prepared_data else "builtin:pydocs")
    prepared = is_prepared_dir(Path(source).expanduser())
    if base.tokenizer == "char" and not prepared:
        raise ValueError(f"--data {source}: the base uses a char tokenizer, which cannot encode other text; omit "
                         f"--data to distil on the base run's own data ({base.prepared_data})")
    tokenizer = "byte" if base.tokenizer == "char" else base.tokenizer  # unused for a prepared source
    data = DataConfig(source=source, tokenizer=tokenizer, seq_len=min(args.seq_len, student.config.max_seq_len))
    train = TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=0.0, grad_clip=args.grad_clip,
                        precision=args.precision, eval_every=args.eval_every, save_every=args.eval_every,
                        eval_batches=4, sample_tokens=0, tensorboard=False, log_every=10)
    return RunConfig(model=student.config, data=data, train=train, guard=GuardConfig(inject=tuple(args.inject)),
                     preset=base.preset, out=str(run_dir), seed=args.seed, device=args.device), prepared


def run_npt(args: Npt) -> NptResult:
    device = resolve_device(args.device)
    check_quantization(args.quantize, device)  # before minutes of loading
    run_dir = Path(args.out) if args.out else unique_run_dir("runs", "npt")
    if launched_by_torchrun()[0] == 0:  # one writer per run directory: rank 0 (or the only process)
        hold(run_dir, "npt")
    base = load_source_model(args.base, "--base")  # on CPU in fp32, in eval mode
    if any(isinstance(block, NPTBlock) for block in base.model.layers):
        raise ValueError(f"--base {args.base!r} is itself an NPT run; pass the base it was trained on")
    student = base.model
    adapter_cfg, reg_weight, kl_weight = _layout(args, run_dir, student)
    teacher = convert_to_npt(student, adapter_cfg)
    n_quantized = quantize_base(student, args.quantize, device)
    cfg, prepared = _run_config(args, base, student, run_dir)
    trainer = Trainer(cfg, run_dir, resume=args.resume, show_progress=args.progress, model=student,
                      objective=DistillationObjective(teacher, adapter_cfg.layers, reg_weight, kl_weight))
    main = trainer.dist.is_main  # under torchrun, rank 0 alone writes and reports
    if prepared and main:  # the shards live elsewhere: keep the tokenizer with this run for generate/eval
        load_prepared(cfg.data.source).tokenizer.save(run_dir / "data")
    if not args.resume and main:
        (run_dir / RUN_FILE).write_text(json.dumps({
            "base": str(args.base), "base_kind": base.kind, "adapters": asdict(adapter_cfg),
            "reg_weight": reg_weight, "kl_weight": kl_weight, "quantize": args.quantize}, indent=1) + "\n")

    n_adapter = sum(p.numel() for p in trainer.params)
    n_frozen = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    say = print if main else (lambda *_: None)
    say(f"nanoseek npt: base {args.base} ({base.kind}), layers {list(adapter_cfg.layers)}, rank {adapter_cfg.rank}"
        f"{', safe mode' if adapter_cfg.safe_mode else ''}; {n_adapter / 1e6:.3f}M adapter parameters train, "
        f"{n_frozen / 1e6:.2f}M frozen{f' ({n_quantized} linears {args.quantize})' if n_quantized else ''}; "
        f"device {trainer.device}, run dir {run_dir}")
    initial = None if args.resume else trainer.evaluate()["loss"]
    if initial is not None:
        say(f"distillation loss before training (validation): {initial:.4f}")
    result = trainer.train()
    adapters_dir = run_dir / "adapters"
    if main:
        save_adapters(student, adapters_dir, base=args.base)
    final = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    say(f"{result.status} at step {result.step}: distillation loss (validation) {final}, {result.n_skips} skipped "
        f"steps; adapters in {adapters_dir}")
    # A quantised run's checkpoints hold no quantised weights (quantize.py): rebuild the base, then attach.
    say(f"generate with: nanoseek.npt.attach_adapters(<the base, quantised again>, {adapters_dir!r})" if n_quantized
        else f"generate with: nanoseek generate --ckpt {run_dir}")
    return NptResult(initial, result.val_loss, result.status, student, teacher)


def cmd_npt(args: Npt) -> int:
    return 0 if run_npt(args).status != "aborted" else 3
