"""Training: the loop (trainer.py) and the guard that judges each step (guard.py), optimizers and LR schedules
(optim.py), atomic checkpoints (checkpoint.py), metrics (metrics.py)."""
