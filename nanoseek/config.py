"""A run's configuration: DataConfig, TrainConfig, GuardConfig, RunConfig, their TOML form, and `load_config`
(ModelConfig and PRESETS live in model_config.py). A bad value raises ValueError naming the field, the value and
the fix, before any data or tensor is touched."""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nanoseek.fault_spec import parse_fault
from nanoseek.model_config import (PRESETS, ModelConfig, _check_choices, _fail, _known_fields, require_non_negative,
                                   require_positive)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

__all__ = ["PRESETS", "DataConfig", "GuardConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_config",
           "require_non_negative", "require_positive", "to_toml", "tomllib"]


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = "builtin:pydocs"  # builtin:pydocs | builtin:stdlib | file | dir | glob | hf:NAME | prepared dir
    tokenizer: str = "bpe"  # char | byte | bpe | path/to/tokenizer.json
    vocab_size: int = 2048  # bpe only: size of the vocabulary to train
    seq_len: int = 128
    val_fraction: float = 0.05
    shard_tokens: int = 1 << 24  # tokens per shard file
    hf_split: str = "train"
    hf_text_field: str = "text"

    def __post_init__(self) -> None:
        require_positive(self, "vocab_size", "seq_len", "shard_tokens")
        if not 0.0 < self.val_fraction < 0.5:
            _fail("val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if self.tokenizer == "bpe" and self.vocab_size < 260:
            _fail("vocab_size", self.vocab_size, "a byte-level BPE needs >= 260 (256 bytes + specials)")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "lion", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    muon_lr: float = 0.02
    schedule: Literal["cosine", "wsd", "constant", "cyclic"] = "cosine"
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: share of steps spent in the final linear decay
    cycle_steps: int = 200  # cyclic: period
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed for the guard)
    zclip: float = 2.5  # ZClip (arXiv 2504.02507): clip grad norms above this EMA z-score (train/clipping.py); 0 = off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    fp8: bool = False  # torchao float8 linears (CUDA >= 8.9); MLA projections, router, head stay high
    activation_checkpointing: bool = False
    loss_chunk: int = 0  # tokens per chunk of head + cross-entropy, recomputed in backward (no full logits); 0 = off
    mtp_rampup_steps: int = 50  # ramp the MTP weight linearly from 0 over these steps
    eval_every: int = 100
    eval_batches: int = 8
    early_stop_patience: int = 0  # evals without improvement before stopping; 0 = off
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999 keeps an EMA copy of the weights for eval
    grad_noise: float = 0.0  # eta of Neelakantan et al. 2015: sigma^2 = eta / (1 + step)^0.55; 0 = off
    save_every: int = 100
    keep_last: int = 2
    keep_best: int = 1
    log_every: int = 10
    sample_tokens: int = 200
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nanoseek"
    # Data parallelism under torchrun (README "Multiple GPUs"): none | ddp | fsdp (FSDP2 fully_shard).
    # batch_size stays per process: the global batch is batch_size * grad_accum * world_size.
    dist: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self) -> None:
        require_positive(self, "batch_size", "grad_accum", "lr", "eval_every", "eval_batches", "save_every",
                         "log_every", "cycle_steps", "muon_lr", "eps")
        require_non_negative(self, "max_steps", "weight_decay", "warmup_steps", "grad_clip", "mtp_rampup_steps",
                             "early_stop_patience", "grad_noise", "keep_best", "sample_tokens", "loss_chunk", "zclip")
        _check_choices(self)
        if self.dist == "fsdp":
            self._check_fsdp()
        if self.fp8 and self.precision != "bf16":
            _fail("fp8", True, "needs precision='bf16' (fp8 matmuls run inside a bf16 autocast)")
        if self.keep_last < 1:
            _fail("keep_last", self.keep_last, "must be >= 1 (the newest checkpoint is what --resume uses)")
        intervals = {"min_lr_ratio": (0.0 <= self.min_lr_ratio <= 1.0, "[0, 1]"),
                     "ema_decay": (0.0 <= self.ema_decay < 1.0, "[0, 1); 0 turns EMA off"),
                     "decay_fraction": (0.0 < self.decay_fraction <= 1.0, "(0, 1]"),
                     "beta1": (0.0 <= self.beta1 < 1.0, "[0, 1)"), "beta2": (0.0 <= self.beta2 < 1.0, "[0, 1)")}
        for name, (inside, interval) in intervals.items():
            if not inside:
                _fail(name, getattr(self, name), f"must be in {interval}")

    def _check_fsdp(self) -> None:
        # What sharded training here does not do (each needs whole tensors, or is untested on shards), and the fix.
        why = {"optimizer": (self.optimizer == "muon", "Muon orthogonalises whole matrices and FSDP holds "
                             "row shards; use --train.dist ddp with Muon, or adamw/lion with fsdp"),
               "ema_decay": (self.ema_decay > 0, "the EMA copy is not sharded; use --train.dist ddp for EMA "
                             "weights, or --train.ema-decay 0"),
               "precision": (self.precision == "fp16", "the fp16 GradScaler is not wired to sharded gradients; "
                             "use --train.precision bf16 (or fp32) with fsdp"),
               "fp8": (self.fp8, "float8 linears on sharded weights are untested in nanoseek; use --train.dist "
                       "ddp with fp8"),
               "grad_noise": (self.grad_noise > 0, "gradient noise is drawn per whole gradient, not per shard; use "
                              "--train.dist ddp, or --train.grad-noise 0")}
        for name, (refused, fix) in why.items():
            if refused:
                _fail(name, getattr(self, name), f"does not work with dist='fsdp': {fix}")


@dataclass
class GuardConfig:
    """The stability guard: what counts as a fault and what is done about it."""

    enabled: bool = True
    window: int = 50  # steps of history for spike statistics (OLMo-core uses 128)
    warmup: int = 20  # steps before spike detection starts (the window must fill first)
    spike_sigma: float = 6.0  # a loss or grad norm this many std above the window mean is a spike
    max_skips: int = 3  # skips within `window` steps before a rollback
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    rollback_skip_batches: int = 0  # batches to skip after a rollback; 0 = the window that led in
    snapshot_every: int = 20  # steps between in-memory good-state snapshots
    stats_every: int = 10  # steps between health-statistic samples
    plateau_margin: float = 0.1  # nats: a loss this close to the unigram entropy after warm-up is a plateau; 0 = off
    plateau_patience: int = 50  # applied steps without 0.1 nats of progress that make a plateau (train/plateau.py)
    plateau_lr_factor: float = 0.1  # LR factor after a plateau or a diverged loss: such an LR is off by a decade
    # Runaway attention-logit growth (Wortsman et al. 2023): a sampled max attention logit above this that grew
    # more than 8-fold within `window` steps means rollback, LR x plateau_lr_factor (under Muon, the Muon group's).
    # For scale (bench/RESULTS.md): SmolLM2-135M peaks at 21, the lab model at its best LR at 35, a healthy 36M
    # run reached 137 slowly enough not to trip it. 0 = off.
    attn_logit_limit: float = 50.0
    save_bad_batches: bool = True  # save a faulted step's batches under RUN_DIR/bad_batches/ (`nanoseek diagnose`)
    inject: tuple[str, ...] = ()  # fault injection: KIND@STEP, e.g. nan-loss@12, inf-act:layers.1.ffn@5

    def __post_init__(self) -> None:
        require_positive(self, "window", "spike_sigma", "max_skips", "rollback_lr_factor", "snapshot_every",
                         "stats_every", "plateau_patience", "plateau_lr_factor")
        require_non_negative(self, "warmup", "max_rollbacks", "rollback_skip_batches", "plateau_margin",
                             "attn_logit_limit")
        if self.warmup > self.window:
            _fail("warmup", self.warmup, f"must be <= window={self.window}: the window could never fill, "
                  "so spike detection would be off")
        self.inject = tuple(self.inject)  # TOML and JSON give lists
        for spec in self.inject:  # a bad --inject fails before any data is prepared
            parse_fault(spec)
        for name in ("rollback_lr_factor", "plateau_lr_factor"):
            if getattr(self, name) > 1:
                _fail(name, getattr(self, name), "must be in (0, 1]: the LR is multiplied by it")


@dataclass
class RunConfig:
    """Everything a run needs; saved as config.toml in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    preset: str = "tiny"
    out: str = ""  # run directory; empty: runs/<preset>-<timestamp>
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.data.seq_len > self.model.max_seq_len:
            _fail("data.seq_len", self.data.seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}")
        if self.train.dist == "fsdp" and self.model.qk_clip_threshold > 0:
            _fail("model.qk_clip_threshold", self.model.qk_clip_threshold, "QK-clip rescales per-head rows that "
                  "FSDP shards across ranks; use --train.dist ddp with QK-clip")

    def to_dict(self) -> dict:
        return {"preset": self.preset, "out": self.out, "seed": self.seed, "device": self.device,
                "model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train),
                "guard": {**dataclasses.asdict(self.guard), "inject": list(self.guard.inject)}}

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        top = _known_fields(cls, values, "run")
        preset = top.get("preset", "tiny")
        # A run's own label (e.g. "converted") names no preset; its [model] section is complete anyway.
        base = ModelConfig.from_preset(preset) if preset in PRESETS else ModelConfig()
        model = ModelConfig.from_dict({**base.to_dict(), **top.pop("model", {})})
        sections = {name: kind(**_known_fields(kind, top.pop(name, {}), name))
                    for name, kind in (("data", DataConfig), ("train", TrainConfig), ("guard", GuardConfig))}
        return cls(model=model, **sections, **top)

    def save_toml(self, path: str | Path) -> None:
        Path(path).write_text(to_toml(self.to_dict()))

    @classmethod
    def load_toml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass a TOML file written by a run or by hand")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        return cls.from_dict(values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # also TOML's inf, -inf and nan
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(values: dict) -> str:
    """A minimal TOML writer for flat tables of scalars and lists (None values are omitted)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict) and v is not None]
    for section, table in values.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def load_config(preset: str | None = None, toml: str | Path | None = None,
                overrides: dict | None = None, saved: RunConfig | None = None) -> RunConfig:
    """The one way a run's configuration is put together; later steps win:

    1. the dataclass defaults;
    2. `toml`, a config file (top-level keys and [model], [data], [train], [guard] sections), or in its place
       `saved`, a run's own config (on --resume, the one its checkpoint was saved with);
    3. `preset`, a model shape from PRESETS: without `toml` or `saved` the start (default "tiny"); over a
       config written for another preset, the preset's model section replaces the config's;
    4. `overrides`, e.g. {"model": {"dim": 256}, "train": {"lr": 3e-4}, "seed": 3}; a model override derives
       again what the preset derived (a GQA head_dim from the new dim, say)."""
    if toml is not None or saved is not None:
        cfg = RunConfig.load_toml(toml) if toml is not None else saved
        if preset is not None and preset != cfg.preset:
            cfg = dataclasses.replace(cfg, model=ModelConfig.from_preset(preset), preset=preset)
    else:
        cfg = RunConfig(model=ModelConfig.from_preset(preset or "tiny"), preset=preset or "tiny")
    overrides = dict(overrides or {})
    sections = {name: _replaced(getattr(cfg, name), overrides.pop(name, {}), name)
                for name in ("model", "data", "train", "guard")}
    return _replaced(cfg, {**overrides, **sections}, "run")


def _replaced(obj: Any, changes: dict, section: str) -> Any:
    _known_fields(type(obj), changes, section)
    return dataclasses.replace(obj, **changes) if changes else obj
