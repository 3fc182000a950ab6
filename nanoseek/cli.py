"""The `nanoseek` command line: one subcommand per job, each a dataclass that tyro turns into flags.

Config precedence for `train`: preset (or --config TOML, or the run's own config.toml with
--resume) < dotted section flags (--model.dim, --train.lr, --data.seq-len, --guard.window ...) <
the shortcuts (--data, --out, --max-steps, --seed, --device, --inject).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.errors import validation_errors_raised
from nanoseek.inference import Check, Eval, Generate, cmd_check, cmd_eval, cmd_generate
from nanoseek.interop.cli_convert import Convert, Heal, cmd_convert, cmd_heal
from nanoseek.npt.cli import Npt, cmd_npt
from nanoseek.report.commands import Report, Runs, cmd_report, cmd_runs
from nanoseek.rundir import command_scope


@dataclass
class Train:
    """Train a model. With no arguments: the `tiny` MLA+MoE+MTP model on the built-in corpus
    (CPython's reference docs), on CPU in a few minutes, ending with a generated sample."""

    preset: str = "tiny"
    """Model preset: tiny, tiny-dense, tiny-gqa, small, medium, large, xl, smoldeepseek-135m."""
    data: str | None = None
    """Corpus: builtin:pydocs | builtin:stdlib | a file, directory or glob of .txt/.md/.jsonl/.parquet |
    hf:NAME | a directory written by `nanoseek prepare`. Shortcut for --data.source."""
    out: str | None = None
    """Run directory (default: runs/PRESET-TIMESTAMP-XXXXXX)."""
    max_steps: int | None = None
    """Training steps (data batches). Shortcut for --train.max-steps."""
    resume: bool = False
    """Continue the run in --out from its latest complete checkpoint (bit-exact on CPU), with the config the
    checkpoint was saved with; flags given now apply on top (shape, tokenizer, data and optimizer kind cannot
    change)."""
    resume_from: str | None = None
    """Resume from this checkpoint of the run instead of the latest: step-N, N, or its directory (implies
    --resume; later checkpoints are moved to checkpoints/abandoned-*, not deleted)."""
    seed: int | None = None
    """Random seed (weights, data order)."""
    device: Literal["auto", "cpu", "cuda"] | None = None
    """Where to train (auto: cuda if available)."""
    dist: Literal["none", "ddp", "fsdp"] | None = None
    """Data parallelism under `torchrun --nproc_per_node=N -m nanoseek train`: ddp, or fsdp (FSDP2 shards
    weights, gradients and optimizer state). Shortcut for --train.dist."""
    hardware: Literal["manual", "auto"] = "manual"
    """auto: set --train.precision/--train.fp8 for the device (H100/H200: bf16 + fp8 with torchao; A100,
    RTX 4090: bf16; other GPUs: fp16 + GradScaler; CPUs with AMX: bf16; other CPUs: fp32) and print why;
    manual: as configured."""
    config: Path | None = None
    """A TOML file with [model], [data], [train], [guard] sections (e.g. a run's config.toml)."""
    inject: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Fault injection to test the stability guard: KIND@STEP, repeatable. Kinds: nan-loss, nan-grad,
    inf-grad, inf-act:MODULE, lr-spike:FACTOR, bad-batch. Under torchrun, KIND@STEP:rankN fires on rank N only."""
    sample: bool = True
    """Print a generated sample at the end."""
    progress: bool = True
    """Show a progress bar."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data_section: Annotated[DataConfig, tyro.conf.arg(name="data")] = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def run_config(self) -> RunConfig:
        guard = self.guard
        if self.inject:
            guard = dataclasses.replace(guard, inject=tuple(guard.inject) + tuple(self.inject))
        data = dataclasses.replace(self.data_section, source=self.data) if self.data else self.data_section
        train = dataclasses.replace(self.train, max_steps=self.max_steps) if self.max_steps is not None else self.train
        train = dataclasses.replace(train, dist=self.dist) if self.dist is not None else train
        base = RunConfig(model=self.model, data=data, train=train, guard=guard, preset=self.preset)
        return dataclasses.replace(base, out=self.out or base.out, seed=self.seed if self.seed is not None else base.seed,
                                   device=self.device or base.device)


@dataclass
class Prepare:
    """Tokenise a corpus into shard files (+ tokenizer and meta.json) that `train --data DIR` reads."""

    out: str
    """Directory to write."""
    data: str = "builtin:pydocs"
    """Corpus (same forms as `train --data`)."""
    tokenizer: str = "bpe"
    """char | byte | bpe | path/to/tokenizer.json"""
    vocab_size: int = 2048
    """BPE vocabulary size."""
    seq_len: int = 128
    """Sequence length the shards must hold at least a few windows of."""
    val_fraction: float = 0.05


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


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in argv, if present (read before tyro parses,
    because the preset, config file or resumed run decides every other default)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def train_defaults(argv: list[str]) -> Train:
    resume = "--resume" in argv or _flag_value(argv, "--resume-from") is not None
    out, preset, config = _flag_value(argv, "--out"), _flag_value(argv, "--preset"), _flag_value(argv, "--config")
    if resume and not out:
        raise ValueError("--resume needs --out RUN_DIR: the run to continue")
    if resume and config is None:  # the checkpoint's own config (else the run's config.toml) is the base
        from nanoseek.rundir import hold
        from nanoseek.train.distributed import launched_by_torchrun
        from nanoseek.train.resume import saved_config

        if Path(out).is_dir() and launched_by_torchrun()[0] == 0:
            hold(out, "train")  # before its state is read: a run another process is writing is refused first
        base = saved_config(out, _flag_value(argv, "--resume-from"))
    if config or resume:
        base = RunConfig.load_toml(config) if config else base
        data = _flag_value(argv, "--data")
        if resume and data is not None and data != base.data.source:
            raise ValueError(f"--resume continues {out} on its own data ({base.data.source}), not --data {data}; "
                             "drop --data, or train on new data in a new run (--out NEW)")
    else:
        name = preset or "tiny"
        base = RunConfig(model=ModelConfig.from_preset(name), preset=name)
    if preset and config and preset != base.preset:
        base = dataclasses.replace(base, model=ModelConfig.from_preset(preset), preset=preset)
    return Train(preset=base.preset, model=base.model, data_section=base.data, train=base.train,
                 guard=dataclasses.replace(base.guard, inject=()), out=base.out or None, seed=base.seed,
                 device=base.device, inject=tuple(base.guard.inject))


def cmd_train(args: Train) -> int:
    from nanoseek.rundir import hold
    from nanoseek.train.distributed import launched_by_torchrun
    from nanoseek.train.trainer import Trainer, default_run_dir

    cfg = args.run_config()
    if args.hardware == "auto":
        from nanoseek.train.hardware import apply_hardware
        from nanoseek.train.trainer import resolve_device

        cfg, choice = apply_hardware(cfg, resolve_device(cfg.device))
        print(f"nanoseek train: --hardware auto -> {choice.precision}{' + fp8' if choice.fp8 else ''}: {choice.reason}")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.preset)
    cfg = dataclasses.replace(cfg, out=str(run_dir))
    if launched_by_torchrun()[0] == 0:  # one writer per run directory: rank 0 (or the only process)
        hold(run_dir, "train")
    trainer = Trainer(cfg, run_dir, resume=args.resume or args.resume_from is not None, show_progress=args.progress,
                      resume_from=args.resume_from)
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
        from nanoseek.generate import generate
        import torch

        tok = trainer.data.tokenizer
        prompt = torch.tensor([[tok.eos_id]], device=trainer.device)  # a document boundary: any tokenizer has it
        text = tok.decode(generate(model, prompt, cfg.train.sample_tokens, eos_id=tok.eos_id)[0, 1:].tolist())
        (run_dir / "samples.txt").write_text(text)
        print("--- sample ---\n" + text + "\n--------------")
    from nanoseek.report import finish_train

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
    from nanoseek.data import prepare_data
    from nanoseek.rundir import hold

    cfg = DataConfig(source=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
                     val_fraction=args.val_fraction)
    hold(args.out, "prepare")
    prepared = prepare_data(cfg, Path(args.out))
    meta = prepared.meta
    print(f"prepared {args.data} -> {args.out}: vocab {prepared.vocab_size}, "
          f"{meta['train']['tokens']:,} train / {meta['val']['tokens']:,} val tokens in "
          f"{len(prepared.train_shards)} + {len(prepared.val_shards)} shards, content {meta['content_hash'][:12]}")
    return 0


def cmd_diagnose(args: Diagnose) -> int:
    from nanoseek.diagnose import diagnose_run

    path, finding, meta = diagnose_run(args.run_dir, args.step)
    print(f"bad batch {path}: step {meta['step']}, cause: {meta['cause']}, action: {meta['action']}")
    if meta.get("injected"):
        print(f"injected faults at that step: {', '.join(meta['injected'])}")
    print(finding.line())
    return 0


def cmd_export(args: Export) -> int:
    from nanoseek.interop import export_hf, hf_model_type, import_hf, is_hf_folder, load_hf_tokenizer
    from nanoseek.interop.export import export_files
    from nanoseek.interop.names import DTYPES
    from nanoseek.rundir import replacing
    from nanoseek.train.loading import load_model

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
    with replacing(args.out, export_files(Path(args.out)), {"config.json"}, "an export") as staging:
        export_hf(model, staging, tokenizer=tok, dtype=dtype)  # an earlier export stays whole until this is
    out = Path(args.out)
    print(f"exported {hf_model_type(model.config)} ({model.num_params() / 1e6:.2f}M parameters) to {out}; "
          f"tokenizer: {'tokenizer.json + tokenizer_config.json' if tok is not None else 'none found'}")
    return 0


def _checkpoint_tokenizer(path: Path):
    """The tokenizer of a run or checkpoint directory: the run's prepared data, else tokenizer files saved in the
    checkpoint or run directory (or its tokenizer/ folder); None when there is none."""
    from nanoseek.data import load_tokenizer
    from nanoseek.train.loading import load_run_tokenizer

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
            with command_scope():  # run-directory locks are held until the command ends
                default = train_defaults(argv) if cls is Train else None
                with validation_errors_raised():  # a bad value is one line (errors.py)
                    args = tyro.cli(cls, args=argv[1:], prog=f"nanoseek {argv[0]}", default=default)
                return handler(args)
        # No (or an unknown) subcommand: tyro prints the overview or the error.
        tyro.extras.subcommand_cli_from_dict({name: cls for name, (cls, _) in COMMANDS.items()}, prog="nanoseek",
                                             args=argv, description=DESCRIPTION)
        return 2
    except Exception as err:  # what a user can cause: one line; a bug: the traceback (errors.py)
        from nanoseek.errors import report

        return report(err)
    except KeyboardInterrupt:
        print("nanoseek: interrupted; a run continues from its latest checkpoint with "
              "nanoseek train --out RUN_DIR --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
