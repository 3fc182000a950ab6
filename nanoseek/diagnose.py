"""The NaN locator: replay a bad step with hooks on every module and name the first that went
non-finite (seed 002's `debug_nan`, made automatic).

On a non-finite event the trainer saves the batch, the RNG state and the model state under
`RUN_DIR/bad_batches/step-N/`; `nanoseek diagnose RUN_DIR [--step N]` replays it any time later.
Replay order: forward hooks (first module whose output is non-finite, in execution order, so a
child is named before its parent), then the loss, then backward hooks (first module whose
gradient is non-finite), and last the recorded parameter gradients of the original step.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.train.distributed import local
from nanoseek.train.faults import FaultInjector

MAX_SAVED = 5  # bad batches kept per run: the first ones explain a run best
BATCH_FILE = "batch.safetensors"
LEGACY_BATCH_FILE = "batch.pt"  # written by earlier versions; read with weights_only=True only


def batch_record(batches) -> dict[str, torch.Tensor]:
    """The step's batches (x: [grad_accum, B, T], y: [grad_accum, B, T + lookahead - 1]) and the torch RNG
    state at the fault, as plain tensors for safetensors."""
    record = {"x": torch.stack([b[0] for b in batches]).contiguous(),
              "y": torch.stack([b[1] for b in batches]).contiguous(), "rng_torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        record.update({f"rng_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return record


def load_batch(bad_dir: Path) -> dict[str, torch.Tensor]:
    """A saved bad batch. safetensors holds no code; a legacy pickle is read with weights_only=True, which no
    environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD included) overrides when passed explicitly."""
    path = bad_dir / BATCH_FILE if (bad_dir / BATCH_FILE).is_file() else bad_dir / LEGACY_BATCH_FILE
    try:
        if path.name == BATCH_FILE:
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # corrupt, or a pickle holding more than tensors: never unpickled further
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: not a bad-batch record nanoseek can read safely ({reason}); delete it") from None


@dataclass
class Finding:
    stage: str  # forward | loss | backward | grad | clean
    module: str | None = None
    tensor: str = ""
    detail: dict = field(default_factory=dict)

    def line(self) -> str:
        if self.stage == "clean":
            return "replay is finite everywhere: the fault did not reproduce (data- or state-dependent)"
        where = f"module {self.module!r}" if self.module is not None else "the loss"
        return f"first non-finite value in {self.stage} at {where}, {self.tensor}; {_ranges(self.detail)}"


def _ranges(detail: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items())


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _summary(tensors: list[torch.Tensor]) -> dict:
    """Range of the finite values and the count of non-finite ones."""
    if not tensors:
        return {}
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    finite = flat[torch.isfinite(flat)]
    out = {"nonfinite": int((~torch.isfinite(flat)).sum()), "numel": flat.numel()}
    if finite.numel():
        out.update(min=f"{finite.min().item():.4g}", max=f"{finite.max().item():.4g}")
    return out


def _nonfinite(tensors: list[torch.Tensor]) -> bool:
    return any(not bool(torch.isfinite(t).all()) for t in tensors)


def replay(model: nn.Module, x: torch.Tensor, y: torch.Tensor, injector: FaultInjector | None = None,
           step: int = -1, autocast=None, grad_findings: list[str] | None = None) -> Finding:
    """Re-run forward/backward of one batch with hooks; x: [B, T], y: [B, T + lookahead - 1]."""
    found: list[Finding] = []
    names = {module: name for name, module in model.named_modules()}

    def forward_hook(module, args, output):
        if not found and _nonfinite(_tensors(output)):
            found.append(Finding("forward", names[module] or "<model>", "output",
                                 {"input": _summary(_tensors(args)), "output": _summary(_tensors(output))}))

    def backward_hook(module, grad_input, grad_output):
        if not found and _nonfinite(_tensors(grad_input)):
            found.append(Finding("backward", names[module] or "<model>", "grad_input",
                                 {"grad_output": _summary(_tensors(grad_output)), "grad_input": _summary(_tensors(grad_input))}))

    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.train()
    activations = injector.activations(step) if injector else contextlib.nullcontext()
    with activations:  # the injection hook must fire before the diagnostic ones
        handles = [m.register_forward_hook(forward_hook) for m in model.modules()]
        try:
            with autocast or contextlib.nullcontext():
                out = model(x, y)
        finally:
            for h in handles:
                h.remove()
    if found:
        model.zero_grad(set_to_none=True)
        model.reset_expert_loads()
        model.train(was_training)
        return found[0]
    loss = injector.loss(step, out.loss) if injector else out.loss
    if not math.isfinite(float(loss.detach())):
        bad = {k: float(v.detach()) for k, v in out.losses.items() if not math.isfinite(float(v.detach()))}
        model.reset_expert_loads()
        model.train(was_training)
        return Finding("loss", None, "loss", {"components": bad or "all finite; the total is not"})
    handles = [m.register_full_backward_hook(backward_hook) for m in model.modules() if m is not model]
    try:
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    model.reset_expert_loads()
    model.train(was_training)
    if found:
        return found[0]
    if grad_findings:
        param = grad_findings[0]
        return Finding("grad", param.rsplit(".", 1)[0], f"gradient of {param}", {"parameters": len(grad_findings)})
    return Finding("clean")


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient (this rank's part of it, under FSDP) holds a NaN or Inf (only
    called on the fault path)."""
    return [name for name, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())]


def locate_and_save(trainer, verdict, batches, model: nn.Module | None = None,
                    faults: FaultInjector | None = None) -> str | None:
    """Trainer hook on a fault: save the bad batch and, for non-finite faults, replay to name the module.

    `model` / `faults` replace the trainer's own (a multi-process run replays one rank's batch, with that
    rank's injections, on an unsharded copy of the weights)."""
    model = model if model is not None else trainer.model
    faults = faults if faults is not None else trainer.faults
    step = trainer.step - 1
    out_dir = trainer.run_dir / "bad_batches" / f"step-{step:08d}"
    saved = sorted((trainer.run_dir / "bad_batches").glob("step-*")) if (trainer.run_dir / "bad_batches").exists() else []
    nonfinite = verdict.cause.startswith("non-finite")
    finding = None
    if nonfinite:
        x, y = batches[0]
        finding = replay(model, x.to(trainer.device), y.to(trainer.device), faults, step,
                         trainer._autocast(), trainer.last_bad_grads)
    if len(saved) < MAX_SAVED:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(batch_record(batches), str(out_dir / BATCH_FILE))  # tensors only: nothing to unpickle on load
        if nonfinite:
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_embeddings:
                state.pop("head.weight", None)
            save_file(state, str(out_dir / "model.safetensors"))
        meta = {"step": step, "cause": verdict.cause, "action": verdict.action, "injected": faults.active(step),
                "finding": finding.line() if finding else None, "module": finding.module if finding else None,
                "nonfinite_grads": trainer.last_bad_grads[:20], "rank": faults.rank, "world_size": faults.world_size}
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return finding.module if finding else None


def diagnose_run(run_dir: str | Path, step: int | None = None) -> tuple[Path, Finding, dict]:
    """Replay a saved bad batch of a run (the latest, or the one at `step`)."""
    from nanoseek.config import RunConfig

    run_dir = Path(run_dir)
    root = run_dir / "bad_batches"
    candidates = sorted(p for p in root.glob("step-*") if (p / "model.safetensors").exists()) if root.exists() else []
    if step is not None:
        candidates = [p for p in candidates if p.name == f"step-{step:08d}"]
    if not candidates:
        what = f"at step {step}" if step is not None else "with a saved model state"
        raise ValueError(f"no bad batch {what} under {root}; runs save one when a NaN/Inf is detected "
                         "(list them with: ls RUN_DIR/bad_batches)")
    bad = candidates[-1]
    cfg = RunConfig.load_toml(run_dir / "config.toml")
    meta = json.loads((bad / "meta.json").read_text())
    from nanoseek.train.loading import model_from_state  # here: loading's import of npt reaches this module

    model = model_from_state(cfg.model, load_file(str(bad / "model.safetensors")),
                             strict=not cfg.model.tie_embeddings)
    batch = load_batch(bad)
    injector = (FaultInjector(meta["injected"], model, meta.get("rank", 0), meta.get("world_size", 1))
                if meta.get("injected") else None)
    finding = replay(model, batch["x"][0], batch["y"][0], injector, meta["step"],
                     grad_findings=meta.get("nonfinite_grads"))
    return bad, finding, meta
