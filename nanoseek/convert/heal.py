"""Heal a converted model: distil the original (teacher) back into it with the ordinary Trainer (guard,
checkpoints, metrics) under train/objectives.py's `distill_objective`, and measure how close the two are."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.data.loader import token_windows
from nanoseek.model import eval_mode
from nanoseek.model.moe import Gate
from nanoseek.train.objectives import distill_objective
from nanoseek.train.trainer import Trainer


@dataclass
class Comparison:
    kl: float  # mean KL(teacher || student) per scored token, nats
    ppl_teacher: float
    ppl_student: float
    top1: float  # share of tokens where both argmaxes agree
    tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"KL {self.kl:.4f} nats/token | perplexity original {self.ppl_teacher:.3f}, converted "
                f"{self.ppl_student:.3f} | top-1 agreement {self.top1:.1%} | {self.tokens} tokens")


@torch.no_grad()
def compare(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor, seq_len: int | None = None,
            batch_size: int = 2) -> Comparison:
    """KL(teacher || student) of the next tokens, both perplexities and top-1 agreement on ids [B, T] (one sequence
    a row) or [N] (cut into windows of seq_len, default min(512, max_seq_len)), `batch_size` windows at a time."""
    if ids.dim() == 1:
        if ids.numel() < 2:
            raise ValueError(f"{ids.numel()} held-out tokens: need at least 2; give more held-out text")
        seq_len = min(seq_len or 512, student.config.max_seq_len, teacher.config.max_seq_len)
        pairs = token_windows([ids.cpu().numpy()], seq_len, batch_size, tail=True)
    else:
        pairs = ((rows[:, :-1], rows[:, 1:]) for rows in ids.split(batch_size))
    kl = ce_t = ce_s = agree = 0.0
    count = 0
    device, teacher_device = next(student.parameters()).device, next(teacher.parameters()).device
    with eval_mode(teacher), eval_mode(student):
        for x, y in pairs:
            x, y = x.to(device), y.to(device).flatten()
            log_t = F.log_softmax(teacher(x.to(teacher_device)).logits.float().to(device), -1).flatten(0, 1)
            log_s = F.log_softmax(student(x).logits.float(), -1).flatten(0, 1)
            kl += float((log_t.exp() * (log_t - log_s)).sum())
            ce_t += float(F.nll_loss(log_t, y, reduction="sum"))
            ce_s += float(F.nll_loss(log_s, y, reduction="sum"))
            agree += float((log_t.argmax(-1) == log_s.argmax(-1)).sum())
            count += y.numel()
    return Comparison(kl / count, math.exp(ce_t / count), math.exp(ce_s / count), agree / count, count)


@dataclass
class HealResult:
    before: Comparison
    after: Comparison
    run_dir: Path
    status: str
    steps: int

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "run_dir": str(self.run_dir)}


def heal(student: torch.nn.Module, teacher: torch.nn.Module, run_cfg, run_dir: str | Path, eval_ids: torch.Tensor,
         temperature: float = 1.0, hidden_weight: float = 0.0, ce_weight: float = 0.0,
         show_progress: bool = True, train_router: bool = False) -> HealResult:
    """Distil `teacher` into `student` for run_cfg.train.max_steps steps, saving checkpoints in run_dir. run_cfg's
    data section must tokenise with the student's tokenizer (its model section gives way to the student's config);
    eval_ids: held-out ids [N] for the before/after `compare`.
    train_router=False keeps the MoE routers as the conversion fitted them: their sigmoid scores spread by only
    ~router_std/4 (moe.py), and Adam moves every weight by ~lr a step whatever its size, so a few healing steps
    would re-draw such a router away from the experts it was fitted to."""
    if not train_router:
        for gate in (m for m in student.modules() if isinstance(m, Gate)):
            gate.weight.requires_grad_(False)
    before = compare(teacher, student, eval_ids)
    trainer = Trainer(run_cfg, run_dir, show_progress=show_progress, model=student,
                      objective=distill_objective(teacher, temperature, hidden_weight, ce_weight))
    result = trainer.train()
    after = compare(teacher.to(next(trainer.model.parameters()).device), trainer.model, eval_ids)
    return HealResult(before, after, Path(run_dir), result.status, result.step)
