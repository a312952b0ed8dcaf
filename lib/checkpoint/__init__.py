"""Checkpoints: the ONE place that writes and reads them (docs/algorithms.md, "Checkpoints and resume").

- format.py: the file format. A torch.save payload followed by a trailer holding its
  length and SHA-256; loading verifies both and unpickles with weights_only=True.
- manager.py: training checkpoints every N steps and/or every T seconds, the last K kept,
  a `latest` pointer moved only after the file is complete, milestones kept for good,
  and loading the newest valid one (falling back, and saying so, past a damaged one).
- state.py: what a training checkpoint holds (model, optimizer, pruner, scaler, step,
  data position, every RNG, best-so-far, log offsets, the RunSpec, versions) and
  putting it back.
"""

from lib.checkpoint.format import CheckpointError, load, save

__all__ = ["CheckpointError", "load", "save"]
