"""The NaN locator: replay a bad step with hooks on every module and name the first that went non-finite,
so a skipped step is explained (which step, which batch, which module) without a debugger.

A faulted step's batches and RNG state (batch.safetensors: tensors only, nothing a loader could execute) and,
for a non-finite fault, the weights go to `RUN_DIR/bad_batches/step-N/`; `nanoseek diagnose RUN_DIR [--step N]`
replays them later. Replay order: forward (the first module whose output is non-finite, in execution order, so
a child is named before its parent), the loss, backward, and last the original step's parameter gradients."""

import contextlib
import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.train.distributed import Distributed, local
from nanoseek.train.faults import FaultInjector
from nanoseek.train.guard import StepStats, Verdict

MAX_SAVED = 5  # bad batches kept per run: the first ones explain a run best
BATCH_FILE = "batch.safetensors"
LEGACY_BATCH_FILE = "batch.pt"  # written by earlier versions; read with weights_only=True only


@dataclasses.dataclass
class Finding:
    stage: str  # forward | loss | backward | grad | clean
    module: str | None = None
    tensor: str = ""
    detail: dict = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        if self.stage == "clean":
            return "replay is finite everywhere: the fault did not reproduce (data- or state-dependent)"
        where = f"module {self.module!r}" if self.module is not None else "the loss"
        ranges = ", ".join(f"{k}={v}" for k, v in self.detail.items())
        return f"first non-finite value in {self.stage} at {where}, {self.tensor}; {ranges}"


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _summary(tensors: list[torch.Tensor]) -> dict:
    if not tensors:
        return {}
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    finite = flat[torch.isfinite(flat)]
    out = {"nonfinite": int((~torch.isfinite(flat)).sum()), "numel": flat.numel()}
    if finite.numel():
        out.update(min=f"{finite.min().item():.4g}", max=f"{finite.max().item():.4g}")
    return out


def replay(model: nn.Module, x: torch.Tensor, y: torch.Tensor, injector: FaultInjector | None = None,
           step: int = -1, autocast=None, grad_findings: list[str] | None = None) -> Finding:
    """Re-run forward/backward of one batch with hooks; x: [B, T], y: [B, T + lookahead - 1]."""
    found: list[Finding] = []
    names = {module: name for name, module in model.named_modules()}

    def note(stage: str, module: nn.Module, tensor: str, parts: dict) -> None:
        if not found and any(not bool(torch.isfinite(t).all()) for t in _tensors(parts[tensor])):
            detail = {key: _summary(_tensors(value)) for key, value in parts.items()}
            found.append(Finding(stage, names[module] or "<model>", tensor, detail))

    def forward_hook(module, args, output):
        note("forward", module, "output", {"input": args, "output": output})

    def backward_hook(module, grad_input, grad_output):
        note("backward", module, "grad_input", {"grad_output": grad_output, "grad_input": grad_input})

    was_training = model.training
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        with contextlib.ExitStack() as hooks:
            hooks.enter_context(injector.activations(step) if injector else contextlib.nullcontext())  # before ours
            for module in model.modules():
                hooks.enter_context(module.register_forward_hook(forward_hook))
                if module is not model:  # a full backward hook wraps the forward's outputs: register it first
                    hooks.enter_context(module.register_full_backward_hook(backward_hook))
            with autocast or contextlib.nullcontext():
                out = model(x, y)
            loss = injector.loss(step, out.loss) if injector else out.loss
            if not found and not math.isfinite(float(loss.detach())):
                bad = {k: float(v.detach()) for k, v in out.losses.items() if not math.isfinite(float(v.detach()))}
                return Finding("loss", None, "loss", {"components": bad or "all finite; the total is not"})
            if not found:
                with warnings.catch_warnings():  # the embedding's input ids carry no gradient: expected here
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
    finally:  # leave the model as it was: no gradients, no expert loads counted by the replay
        model.zero_grad(set_to_none=True)
        model.reset_expert_loads()
        model.train(was_training)
    if found:
        return found[0]
    if grad_findings:  # finite on replay: name the parameters of the original step
        param = grad_findings[0]
        return Finding("grad", param.rsplit(".", 1)[0], f"gradient of {param}", {"parameters": len(grad_findings)})
    return Finding("clean")


def nonfinite_grads(model: nn.Module) -> list[str]:
    """Names of parameters whose gradient (this rank's part, under FSDP) holds a NaN or Inf."""
    return [name for name, p in model.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())]


def batch_record(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The step's batches (x [grad_accum, B, T], y [grad_accum, B, T + lookahead - 1]) and RNG state, as tensors."""
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


class BadStepRecorder:
    """On a faulted step, every rank calls `record` (a collective; all hold the same verdict) and rank 0 saves
    and replays the batch of the rank where the fault began (its own batch was bad, else its loss, else its
    gradients were non-finite), under FSDP on an unsharded copy of the weights (`whole_copy(state)`; None
    when the model cannot be rebuilt on one rank)."""

    def __init__(self, run_dir: Path, dist: Distributed, model: nn.Module, inject: tuple[str, ...],
                 autocast: Callable[[], contextlib.AbstractContextManager],
                 whole_copy: Callable[[dict], nn.Module] | None, log: Callable[[str], None]):
        self.run_dir, self.dist, self.model, self.inject = run_dir, dist, model, inject
        self.autocast, self.whole_copy, self.log = autocast, whole_copy, log

    def record(self, verdict: Verdict, stats: StepStats, batches: list) -> Verdict:
        """The verdict, with the module the fault began in when found. The first MAX_SAVED faulted steps keep their
        batches (x [B, T], y [B, T + lookahead - 1]) in bad_batches/step-N/, with the weights if non-finite."""
        if verdict.action == "overflow":
            return verdict
        step, view, nonfinite = stats.step, stats.rank, verdict.cause.startswith("non-finite")
        if self.dist.mode == "fsdp" and self.whole_copy is None:
            self.log(f"[guard] step {step}: no bad-batch record (FSDP with a model passed to the Trainer cannot be "
                     "replayed on one rank; use --dist ddp to keep records)")
            return verdict
        mine = {"batch_ok": view.batch_ok, "bad_grads": nonfinite_grads(self.model) if nonfinite else [],
                "batches": [(x.cpu(), y.cpu()) for x, y in batches],
                # no loss or norm: no forward ran (a bad batch somewhere)
                "loss_ok": view.loss is None or math.isfinite(float(view.loss)),
                "grad_ok": view.grad_norm is None or math.isfinite(float(view.grad_norm))}
        everyone = self.dist.gather_objects(mine)
        state = self.dist.full_model_state(self.model) if nonfinite and self.dist.mode == "fsdp" else None
        if not self.dist.is_main:
            return verdict
        culprit = next((r for key in ("batch_ok", "loss_ok", "grad_ok") for r, info in enumerate(everyone)
                        if not info[key]), 0)
        batches = everyone[culprit]["batches"]  # the culprit's, replayed with its faults
        bad_grads = list(dict.fromkeys(name for info in everyone for name in info["bad_grads"]))
        model = self.whole_copy(state) if state is not None else self.model  # a shard cannot run alone
        injector = FaultInjector(self.inject, model, culprit, self.dist.world_size)
        finding = None
        if nonfinite:
            x, y = (t.to(self.dist.device) for t in batches[0])
            finding = replay(model, x, y, injector, step, self.autocast(), bad_grads)
        module = finding.module if finding else None
        root = self.run_dir / "bad_batches"
        if len(list(root.glob("step-*"))) < MAX_SAVED:
            out_dir = root / f"step-{step:08d}"
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(batch_record(batches), str(out_dir / BATCH_FILE))  # tensors only: nothing to unpickle on load
            if nonfinite:
                tied = {"head.weight"} if model.config.tie_embeddings else set()
                weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in tied}
                save_file(weights, str(out_dir / "model.safetensors"))
            meta = {"step": step, "cause": verdict.cause, "action": verdict.action, "injected": injector.active(step),
                    "finding": finding.line() if finding else None, "module": module,
                    "nonfinite_grads": bad_grads[:20], "rank": culprit, "world_size": self.dist.world_size}
            (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        if self.dist.world_size > 1:
            self.log(f"[guard] step {step}: the fault began on rank {culprit}")
        return dataclasses.replace(verdict, module=module)
