"""The machinery every training run of vlfast shares (VPGTrans's runs and the P-Former's): seeded
data order, stages with their own optimizers, epoch- or step-based budgets, evaluation, atomic
checkpoints, stop signals, progress bars and TensorBoard logs, and exact resumption."""
from vlfast.training.loop import Run, Stage, epoch_steps, seed_for
from vlfast.training.signals import Interrupted, StopSignals

__all__ = ["Interrupted", "Run", "Stage", "StopSignals", "epoch_steps", "seed_for"]
