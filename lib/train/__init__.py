"""One run: run.py is its process (spec.json in, summary.json out, whatever happens), trainer.py the one
training loop every model shares, distributed.py the ranks, tracking.py the optional trackers,
provenance.py what a record says about where it came from, classification.py the image tasks' shared
evaluation.

Kept empty of imports: lib.core.task and the model families import pieces of it without the trainer."""
