"""One run: run.py is its process (spec.json in, summary.json out, whatever happens), trainer.py the one
training loop every model shares, distributed.py the ranks, probe.py the out-of-memory probe, tracking.py
the optional trackers, classification.py the image tasks' shared evaluation.

Kept empty of imports: lib.core.task and the model families import pieces of it without the trainer."""
