"""Structural pruning's surgery: stats.py gathers structure statistics while training, cut.py removes
structures and carries every piece of state across, dependency.py says which tensors follow a channel,
command.py is `make surgery` (and surgery inside a run), measure.py measures what a cut changed.

Kept empty of imports: the trainer reads stats.py without pulling in the rest."""
