"""The `nanoseek` command line: one subcommand per job, each a dataclass that tyro turns into flags.

`train` reads its settings through nanoseek.config.load_config: the preset (or --config TOML, or the run's
own config.toml with --resume), then the flags on top (--model.dim, --train.lr, --data.seq-len,
--guard.window ..., and --data, --max-steps, --dist, --inject, --seed, --device, --out).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from nanoseek.cli.convert import Convert, Heal, cmd_convert, cmd_heal
from nanoseek.cli.inference import Check, Eval, Generate, cmd_check, cmd_eval, cmd_generate
from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig, load_config
from nanoseek.data import load_tokenizer, prepare_data
from nanoseek.diagnose import diagnose_run
from nanoseek.generate import generate
from nanoseek.interop import export_hf, hf_model_type, import_hf, is_hf_folder, load_hf_tokenizer
from nanoseek.interop.names import DTYPES
from nanoseek.npt.cli import Npt, cmd_npt
from nanoseek.report import finish_train
from nanoseek.report.commands import Report, Runs, cmd_report, cmd_runs
from nanoseek.train.hardware import apply_hardware, resolve_device
from nanoseek.train.loading import load_model, load_run_tokenizer
from nanoseek.train.trainer import Trainer, default_run_dir


# The config sections as flags. Four settings are flags of their own, without a section prefix, because
# users reach for them first: --data (data.source), --max-steps, --dist (train.*) and --inject (guard.*).


@dataclass
class ModelFlags(ModelConfig):
    derived: Annotated[dict, tyro.conf.Suppress] = field(default_factory=dict, compare=False)


@dataclass
class DataFlags(DataConfig):
    source: Annotated[str, tyro.conf.arg(name="data", prefix_name=False)] = "builtin:pydocs"
    """Corpus: builtin:pydocs | builtin:stdlib | a file, directory or glob of .txt/.md/.jsonl/.parquet |
    hf:NAME | a directory written by `nanoseek prepare`."""


@dataclass
class TrainFlags(TrainConfig):
    max_steps: Annotated[int, tyro.conf.arg(prefix_name=False)] = 300
    """Training steps (data batches)."""
    dist: Annotated[Literal["none", "ddp", "fsdp"], tyro.conf.arg(prefix_name=False)] = "none"
    """Data parallelism under `torchrun --nproc_per_node=N -m nanoseek train`: ddp, or fsdp (FSDP2 shards
    weights, gradients and optimizer state). batch_size stays per process."""


@dataclass
class GuardFlags(GuardConfig):
    inject: Annotated[tuple[str, ...], tyro.conf.arg(prefix_name=False), tyro.conf.UseAppendAction] = ()
    """Fault injection to test the stability guard: KIND@STEP, repeatable. Kinds: nan-loss, nan-grad,
    inf-grad, inf-act:MODULE, lr-spike:FACTOR, bad-batch. Under torchrun, KIND@STEP:rankN fires on rank N only."""


def _as(cls: type, section: object) -> object:
    """`section` as an instance of `cls` (a config dataclass or its flags subclass), field by field."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Train:
    """Train a model. With no arguments: the `tiny` MLA+MoE+MTP model on the built-in corpus
    (CPython's reference docs), on CPU in a few minutes, ending with a generated sample.

    Settings come from the preset (or --config FILE, or with --resume the run's own config.toml), then
    the flags on top (nanoseek.config.load_config)."""

    preset: str = "tiny"
    """Model preset: tiny, tiny-dense, tiny-gqa, small, medium, large, xl, smoldeepseek-135m."""
    config: Path | None = None
    """A TOML file with [model], [data], [train], [guard] sections (e.g. a run's config.toml)."""
    out: str | None = None
    """Run directory (default: runs/PRESET-TIMESTAMP)."""
    resume: bool = False
    """Continue the run in --out from its latest complete checkpoint (bit-exact on CPU)."""
    seed: int = 1337
    """Random seed (weights, data order)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (auto: cuda if available)."""
    hardware: Literal["manual", "auto"] = "manual"
    """auto: set --train.precision/--train.fp8 for the device (H100/H200: bf16 + fp8 with torchao; A100,
    RTX 4090: bf16; other GPUs: fp16 + GradScaler; CPUs with AMX: bf16; other CPUs: fp32) and print why;
    manual: as configured."""
    sample: bool = True
    """Print a generated sample at the end."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelFlags = field(default_factory=ModelFlags)
    data: DataFlags = field(default_factory=DataFlags)
    train: TrainFlags = field(default_factory=TrainFlags)
    guard: GuardFlags = field(default_factory=GuardFlags)

    @classmethod
    def from_config(cls, cfg: RunConfig, **options) -> "Train":
        return cls(preset=cfg.preset, out=cfg.out or None, seed=cfg.seed, device=cfg.device,
                   model=_as(ModelFlags, cfg.model), data=_as(DataFlags, cfg.data), train=_as(TrainFlags, cfg.train),
                   guard=_as(GuardFlags, cfg.guard), **options)

    def run_config(self) -> RunConfig:
        return RunConfig(model=_as(ModelConfig, self.model), data=_as(DataConfig, self.data),
                         train=_as(TrainConfig, self.train), guard=_as(GuardConfig, self.guard),
                         preset=self.preset, out=self.out or "", seed=self.seed, device=self.device)


@dataclass
class _Start:
    """What decides every other default of `train`: read first, the rest of argv is left for Train."""

    preset: str | None = None
    config: Path | None = None
    out: str | None = None
    resume: bool = False
    data: str | None = None


def parse_train(argv: list[str]) -> Train:
    """`nanoseek train` ARGV -> Train: load_config(preset | config file | the resumed run's config.toml),
    then every flag on top of it."""
    start, _ = tyro.cli(_Start, args=argv, return_unknown_args=True, add_help=False, console_outputs=False)
    config = start.config
    if start.resume:
        if not start.out:
            raise ValueError("--resume needs --out RUN_DIR: the run to continue")
        saved = Path(start.out) / "config.toml"
        config = config or (saved if saved.exists() else None)
    base = load_config(start.preset, config)
    if start.resume and config is not None and start.data is not None and start.data != base.data.source:
        raise ValueError(f"--resume continues {start.out} on its own data ({base.data.source}), not --data "
                         f"{start.data}; drop --data, or train on new data in a new run (--out NEW)")
    default = Train.from_config(base, config=config)
    return tyro.cli(Train, args=argv, prog="nanoseek train", default=default)


@dataclass
class Prepare:
    """Tokenise a corpus into shard files (+ tokenizer and meta.json) that `train --data DIR` reads."""

    out: str
    """Directory to write."""
    data: DataFlags = field(default_factory=DataFlags)


@dataclass
class Diagnose:
    """Replay a saved bad batch of a run and name the first module that went non-finite."""

    run_dir: tyro.conf.Positional[str]
    step: int | None = None
    """The bad batch's step (default: the latest saved)."""


@dataclass
class Export:
    """Write a model as a Hugging Face transformers folder (DeepseekV3 / DeepseekV2 / Llama / Qwen3)."""

    path: tyro.conf.Positional[str]
    """A run directory (latest checkpoint), a checkpoint directory, or a transformers folder (re-exported)."""
    out: str
    """Folder to write (config.json, model.safetensors, tokenizer files)."""
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """Weight dtype on disk (default: the source's)."""


def cmd_train(args: Train) -> int:
    cfg = args.run_config()
    if args.hardware == "auto":
        cfg, choice = apply_hardware(cfg, resolve_device(cfg.device))
        print(f"nanoseek train: --hardware auto -> {choice.precision}{' + fp8' if choice.fp8 else ''}: {choice.reason}")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.preset)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    trainer = Trainer(cfg, run_dir, resume=args.resume, show_progress=args.progress)
    model = trainer.model
    if trainer.dist.is_main:
        print(f"nanoseek train: preset {cfg.preset}, {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(active=True) / 1e6:.2f}M active), {trainer.data.vocab_size} vocab, "
              f"device {trainer.device}, {cfg.train.precision}{' + fp8' if cfg.train.fp8 else ''}, run dir {run_dir}")
        if cfg.train.compile:
            print("nanoseek train: torch.compile: the first step compiles the model (a minute or more on a CPU)")
    result = trainer.train()
    if not trainer.dist.is_main:  # under torchrun rank 0 speaks for the run
        return result.exit_code
    model = trainer.model  # under FSDP: an unsharded copy of the final weights
    if args.sample and cfg.train.sample_tokens and result.status not in ("aborted", "interrupted"):
        tok = trainer.data.tokenizer
        prompt = torch.tensor([[tok.eos_id]], device=trainer.device)  # a document boundary: any tokenizer has it
        text = tok.decode(generate(model, prompt, cfg.train.sample_tokens, eos_id=tok.eos_id)[0, 1:].tolist())
        (run_dir / "samples.txt").write_text(text)
        print("--- sample ---\n" + text + "\n--------------")

    print(finish_train(run_dir, result))  # steps, tokens, time, best val, checkpoints, guard events, report
    if result.status == "aborted":
        print(f"aborted: the stability guard ran out of rollbacks; see {run_dir / 'metrics.jsonl'} "
              f"and run: nanoseek diagnose {run_dir}", file=sys.stderr)
    if result.status == "interrupted":
        print(f"interrupted at step {result.step}, checkpoint saved; continue with: "
              f"nanoseek train --out {run_dir} --resume", file=sys.stderr)
    return result.exit_code


def cmd_prepare(args: Prepare) -> int:
    cfg = _as(DataConfig, args.data)
    prepared = prepare_data(cfg, Path(args.out))
    meta = prepared.meta
    print(f"prepared {cfg.source} -> {args.out}: vocab {prepared.vocab_size}, "
          f"{meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens in "
          f"{len(prepared.train_shards)} + {len(prepared.val_shards)} shards, content {meta['content_hash'][:12]}")
    return 0


def cmd_diagnose(args: Diagnose) -> int:
    path, finding, meta = diagnose_run(args.run_dir, args.step)
    print(f"bad batch {path}: step {meta['step']}, cause: {meta['cause']}, action: {meta['action']}")
    if meta.get("injected"):
        print(f"injected faults at that step: {', '.join(meta['injected'])}")
    print(finding.line())
    return 0


def cmd_export(args: Export) -> int:
    source = Path(args.path)
    if source.exists() and Path(args.out).resolve() == source.resolve():
        raise ValueError(f"--out {args.out} is the source folder itself; write the export to a new folder")
    dtype = args.dtype
    if is_hf_folder(source):  # re-export: e.g. a folder `nanoseek convert` or transformers wrote
        model, tok = import_hf(source), load_hf_tokenizer(source)
        saved = model.hf_config.get("torch_dtype") or model.hf_config.get("dtype")
        dtype = dtype or (saved if saved in DTYPES else "fp32")  # export_hf reads "bfloat16" and "bf16" alike
    else:
        model, _ = load_model(source)
        tok = _checkpoint_tokenizer(source)
    out = export_hf(model, args.out, tokenizer=tok, dtype=dtype)
    print(f"exported {hf_model_type(model.config)} ({model.num_params() / 1e6:.2f}M parameters) to {out}; "
          f"tokenizer: {'tokenizer.json + tokenizer_config.json' if tok is not None else 'none found'}")
    return 0


def _checkpoint_tokenizer(path: Path):
    """The tokenizer of a run or checkpoint directory: the run's prepared data, else tokenizer files saved in the
    checkpoint or run directory (or its tokenizer/ folder); None when there is none."""
    try:
        return load_run_tokenizer(path)
    except ValueError:
        pass
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
    for folder in (path, run_dir, run_dir / "tokenizer"):
        if (folder / "tokenizer_meta.json").is_file() or (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
    return None


COMMANDS = {"train": (Train, cmd_train), "prepare": (Prepare, cmd_prepare), "generate": (Generate, cmd_generate),
            "eval": (Eval, cmd_eval), "check": (Check, cmd_check),
            "diagnose": (Diagnose, cmd_diagnose), "export": (Export, cmd_export), "npt": (Npt, cmd_npt),
            "report": (Report, cmd_report), "runs": (Runs, cmd_runs),
            "convert": (Convert, cmd_convert), "heal": (Heal, cmd_heal)}


DESCRIPTION = "Train small DeepSeek-style language models that never blow up silently."


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user (an export's numerics, a skipped MTP layer) read as one line, not as
    a source location inside the package."""
    print(f"nanoseek: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warning
    try:
        if argv and argv[0] in COMMANDS:
            cls, handler = COMMANDS[argv[0]]
            args = parse_train(argv[1:]) if cls is Train else tyro.cli(cls, args=argv[1:], prog=f"nanoseek {argv[0]}")
            return handler(args)
        # No (or an unknown) subcommand: tyro prints the overview or the error.
        tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}, prog="nanoseek",
                                             args=argv, description=DESCRIPTION)
        return 2
    except ValueError as err:  # errors a user can cause: one line, no traceback
        print(f"nanoseek: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nanoseek: interrupted; a run continues from its latest checkpoint with "
              "nanoseek train --out RUN_DIR --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
