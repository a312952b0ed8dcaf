"""The one-shot sweep (`make sweep`): oneshot.py runs it and recommends, measure.py measures size and speed
beside dense, report.py writes sweep.json, sweep.md and the graph; its settings are parsed with the
others, in lib/config/sweep.py."""
