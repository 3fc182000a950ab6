"""The `nanoseek` command line: one subcommand per job, each a dataclass whose fields tyro turns into flags."""

import dataclasses
import signal
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
from nanoseek.errors import report, validation_errors_raised
from nanoseek.generate import generate
from nanoseek.interop import export_hf, hf_model_type, import_hf, is_hf_folder, load_hf_tokenizer
from nanoseek.interop.export import export_files
from nanoseek.interop.names import DTYPES
from nanoseek.npt.cli import Npt, cmd_npt
from nanoseek.report import Report, Runs, cmd_report, cmd_runs, finish_train
from nanoseek.rundir import command_scope, hold, replacing
from nanoseek.train.distributed import launched_by_torchrun
from nanoseek.train.hardware import apply_hardware, resolve_device
from nanoseek.train.loading import load_model, run_dir_of
from nanoseek.train.resume import saved_config
from nanoseek.train.trainer import Trainer, default_run_dir


# The config sections as flags (--model.dim, --train.lr, ...); the settings users reach for first drop the prefix.
@dataclass
class ModelFlags(ModelConfig):
    derived: Annotated[dict, tyro.conf.Suppress] = field(default_factory=dict, compare=False)


@dataclass
class DataFlags(DataConfig):
    source: Annotated[str, tyro.conf.arg(name="data", prefix_name=False)] = "builtin:pydocs"
    """builtin:pydocs | builtin:stdlib | a file, dir or glob of .txt/.md/.jsonl/.parquet | hf:NAME | a `prepare` dir."""


@dataclass
class TrainFlags(TrainConfig):
    max_steps: Annotated[int, tyro.conf.arg(prefix_name=False)] = 300  # Training steps (data batches).
    dist: Annotated[Literal["none", "ddp", "fsdp"], tyro.conf.arg(prefix_name=False)] = "none"
    """Data parallelism under `torchrun --nproc_per_node=N -m nanoseek train`: ddp, or fsdp (FSDP2 shards
    weights, gradients and optimizer state). batch_size stays per process."""


@dataclass
class GuardFlags(GuardConfig):
    inject: Annotated[tuple[str, ...], tyro.conf.arg(prefix_name=False), tyro.conf.UseAppendAction] = ()
    """Fault injection to test the stability guard: KIND@STEP, repeatable. Kinds: nan-loss, nan-grad,
    inf-grad, inf-act:MODULE, lr-spike:FACTOR, bad-batch. Under torchrun, KIND@STEP:rankN fires on rank N only."""


def _as(cls: type, section: object) -> object:
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


@dataclass
class Train:
    """Train a model. With no arguments: the `tiny` MLA+MoE+MTP model on the built-in corpus
    (CPython's reference docs), on CPU in a few minutes, ending with a generated sample.

    Settings: the preset (or --config FILE, or with --resume the checkpoint's own config), then flags on top."""

    preset: str = "tiny"  # Model preset: tiny, tiny-dense, tiny-gqa, small, medium, large, xl, smoldeepseek-135m.
    config: Path | None = None  # A TOML file with [model], [data], [train], [guard] sections (a run's config.toml).
    out: str | None = None  # Run directory (default: runs/PRESET-TIMESTAMP-XXXXXX).
    resume: bool = False
    """Continue the run in --out from its latest complete checkpoint (bit-exact on CPU), with the config it was
    saved with; flags given now apply on top (shape, tokenizer, data and optimizer kind cannot change)."""
    resume_from: str | None = None
    """Resume from this checkpoint of the run instead of the latest: step-N, N, or its directory (implies
    --resume; later checkpoints are moved to checkpoints/abandoned-*, not deleted)."""
    seed: int = 1337  # Random seed (weights, data order).
    device: Literal["auto", "cpu", "cuda"] = "auto"  # Where to train (auto: cuda if available).
    hardware: Literal["manual", "auto"] = "manual"
    """auto: set --train.precision/--train.fp8 for the device (H100/H200: bf16 + fp8 with torchao; A100, RTX 4090:
    bf16; other GPUs: fp16 + GradScaler; CPUs with AMX: bf16; other CPUs: fp32) and print why; manual: as configured."""
    sample: bool = True  # Print a generated sample at the end.
    progress: bool = True  # Show a progress bar.
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
    """The flags that decide every other default of `train`, read before the rest."""

    preset: str | None = None
    config: Path | None = None
    out: str | None = None
    resume: bool = False
    resume_from: str | None = None
    data: str | None = None


def parse_train(argv: list[str]) -> Train:
    """`nanoseek train` ARGV -> Train: the base config (see Train) read first, then every flag on top."""
    start, _ = tyro.cli(_Start, args=argv, return_unknown_args=True, add_help=False, console_outputs=False)
    resume, saved = start.resume or start.resume_from is not None, None
    if resume and not start.out:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    if resume and start.config is None:
        if Path(start.out).is_dir() and launched_by_torchrun()[0] == 0:
            hold(start.out, "train")  # before its state is read: a run another process is writing is refused first
        saved = saved_config(start.out, start.resume_from)
    base = load_config(start.preset, start.config, saved=saved)
    if resume and start.data is not None and start.data != base.data.source:
        raise ValueError(f"--resume continues {start.out} on its own data ({base.data.source}), not --data "
                         f"{start.data}; drop --data, or train on new data in a new run (--out NEW)")
    return tyro.cli(Train, args=argv, prog="nanoseek train", default=Train.from_config(base, config=start.config))


@dataclass
class Prepare:
    """Tokenise a corpus into shard files (+ tokenizer and meta.json) that `train --data DIR` reads."""

    out: str  # Directory to write.
    data: DataFlags = field(default_factory=DataFlags)


@dataclass
class Diagnose:
    """Replay a saved bad batch of a run and name the first module that went non-finite."""

    run_dir: tyro.conf.Positional[str]
    step: int | None = None  # The bad batch's step (default: the latest saved).


@dataclass
class Export:
    """Write a model as a Hugging Face transformers folder (DeepseekV3 / DeepseekV2 / Llama / Qwen3)."""

    path: tyro.conf.Positional[str]  # Run dir (latest checkpoint), checkpoint dir or transformers folder (re-exported).
    out: str  # Folder to write (config.json, model.safetensors, tokenizer files).
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # Weight dtype on disk (default: the source's).


def cmd_train(args: Train) -> int:
    cfg = args.run_config()
    if args.hardware == "auto":
        cfg, choice = apply_hardware(cfg, resolve_device(cfg.device))
        print(f"nanoseek train: --hardware auto -> {choice.precision}{' + fp8' if choice.fp8 else ''}: {choice.reason}")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.preset)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    if launched_by_torchrun()[0] == 0:  # one writer per run directory: rank 0 (or the only process)
        hold(run_dir, "train")
    trainer = Trainer(cfg, run_dir, resume=args.resume or args.resume_from is not None, show_progress=args.progress,
                      resume_from=args.resume_from)
    if trainer.dist.is_main:
        n_params, n_active = trainer.model.num_params(), trainer.model.num_params(active=True)
        print(f"nanoseek train: preset {cfg.preset}, {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active), "
              f"{trainer.data.vocab_size} vocab, device {trainer.device}, "
              f"{cfg.train.precision}{' + fp8' if cfg.train.fp8 else ''}, run dir {run_dir}")
        if cfg.train.compile:
            print("nanoseek train: torch.compile: the first step compiles the model (a minute or more on a CPU)")
    result = trainer.train()
    if not trainer.dist.is_main:  # under torchrun rank 0 speaks for the run
        return result.exit_code
    if args.sample and cfg.train.sample_tokens and result.status not in ("aborted", "interrupted"):
        tok = trainer.data.tokenizer
        prompt = torch.tensor([[tok.eos_id]], device=trainer.device)  # a document boundary: any tokenizer has it
        # trainer.model: under FSDP an unsharded copy of the final weights
        text = tok.decode(generate(trainer.model, prompt, cfg.train.sample_tokens, eos_id=tok.eos_id)[0, 1:].tolist())
        (run_dir / "samples.txt").write_text(text)
        print("--- sample ---\n" + text + "\n--------------")
    print(finish_train(run_dir, result))  # steps, tokens, time, best val, checkpoints, guard events, report
    if result.status == "aborted":
        print(f"aborted: the stability guard ran out of rollbacks; see {run_dir / 'metrics.jsonl'} "
              f"and run: nanoseek diagnose {run_dir}", file=sys.stderr)
    if result.status == "interrupted":
        how = signal.Signals(result.stop_signal).name if result.stop_signal else "interrupted"
        print(f"{how}: stopped at step {result.step}, checkpoint saved; continue with: "
              f"nanoseek train --out {run_dir} --resume", file=sys.stderr)
    return result.exit_code


def cmd_prepare(args: Prepare) -> int:
    cfg = _as(DataConfig, args.data)
    hold(args.out, "prepare")
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
    source, out = Path(args.path), Path(args.out)
    if source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {args.out} is the source folder itself; write the export to a new folder")
    dtype = args.dtype
    if is_hf_folder(source):  # re-export: e.g. a folder `nanoseek convert` or transformers wrote
        model, tok = import_hf(source), load_hf_tokenizer(source)
        saved = model.hf_config.get("torch_dtype") or model.hf_config.get("dtype")
        dtype = dtype or (saved if saved in DTYPES else "fp32")  # export_hf reads "bfloat16" and "bf16" alike
    else:
        model, tok = load_model(source)[0], _checkpoint_tokenizer(source)
    with replacing(out, export_files(out), {"config.json"}, "an export") as staging:
        export_hf(model, staging, tokenizer=tok, dtype=dtype)  # an earlier export stays whole until this is
    print(f"exported {hf_model_type(model.config)} ({model.num_params() / 1e6:.2f}M parameters) to {out}; "
          f"tokenizer: {'tokenizer.json + tokenizer_config.json' if tok is not None else 'none found'}")
    return 0


def _checkpoint_tokenizer(path: Path):
    """The tokenizer of a run or checkpoint directory: its run's data/, else tokenizer files beside it; or None."""
    run_dir = run_dir_of(path) or (path.parent.parent if path.parent.name == "checkpoints" else path)
    for folder in (run_dir / "data", path, run_dir, run_dir / "tokenizer"):
        if (folder / "tokenizer_meta.json").is_file() or (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
    return None


DESCRIPTION = "Train small DeepSeek-style language models that never blow up silently."
COMMANDS = {"train": (Train, cmd_train), "prepare": (Prepare, cmd_prepare), "generate": (Generate, cmd_generate),
            "eval": (Eval, cmd_eval), "check": (Check, cmd_check), "diagnose": (Diagnose, cmd_diagnose),
            "export": (Export, cmd_export), "npt": (Npt, cmd_npt), "report": (Report, cmd_report),
            "runs": (Runs, cmd_runs), "convert": (Convert, cmd_convert), "heal": (Heal, cmd_heal)}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user (an export's numerics, a skipped MTP layer): one line, not a source location."""
    print(f"nanoseek: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _one_line_warning
    try:
        if argv and argv[0] in COMMANDS:
            cls, handler = COMMANDS[argv[0]]
            with command_scope():  # run-directory locks are held until the command ends
                with validation_errors_raised():  # a bad value is one line (errors.py), not tyro's box
                    args = (parse_train(argv[1:]) if cls is Train
                            else tyro.cli(cls, args=argv[1:], prog=f"nanoseek {argv[0]}"))
                return handler(args)
        # No (or an unknown) subcommand: tyro prints the overview or the error.
        tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}, prog="nanoseek",
                                             args=argv, description=DESCRIPTION)
        return 2
    except Exception as err:  # what a user can cause: one line; a bug: the traceback (errors.py)
        return report(err)
    except KeyboardInterrupt:
        print("nanoseek: interrupted; a run continues from its latest checkpoint with "
              "nanoseek train --out RUN_DIR --resume", file=sys.stderr)
        return 130
