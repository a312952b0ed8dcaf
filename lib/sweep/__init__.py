"""The one-shot sweep (`make sweep`): oneshot.py runs it and recommends, measure.py measures size and speed
beside dense, report.py writes sweep.json, sweep.md and the graph, settings.py parses its settings.

Kept empty of imports: lib/config reads settings.py without pulling in the sweep itself."""
