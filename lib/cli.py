"""The command line behind the Makefile: ``python -m lib.cli COMMAND [--set SYMBOL=VALUE ...]``.

Commands: check (validate .config), dry-run (print the matrix and plans), hwinfo
(what devices were detected, and each run's plan with its rationale), run
(train the matrix), continue (finish the newest unfinished results folder),
report (rewrite summary.json, graphs/ and report.md of a results folder), graphs
(redraw graphs/ only), compare (Markdown ranking of methods, or two folders side
by side), publish (copy a results folder into key_results/), prepare-data,
export (a run's best checkpoint as safetensors; --format hf: a transformers folder),
import (check a transformers GPT-2 folder to start runs from), eval (lm-evaluation-harness on a
run's transformers export, lib/results/lmeval.py), surgery (cut a run's checkpoint
smaller, lib/surgery/command.py), sweep (one-shot sparsity sweep on a run's best
checkpoint, or on every ok run of a results folder, lib/sweep/oneshot.py), rerun (train one
run again from its spec.json and compare, lib/matrix/rerun.py).
A HarnessError prints as one line ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from lib.core.errors import HarnessError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib.cli", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "dry-run", "hwinfo", "run", "continue", "report", "graphs",
                                            "compare", "publish", "prepare-data", "export", "import",
                                            "eval", "surgery", "sweep", "status", "rerun"])
    parser.add_argument("--config", default=".config", help="the .config to read (default: .config)")
    parser.add_argument("--set", action="append", default=[], metavar="SYMBOL=VALUE",
                        help="override a symbol for this invocation only (make MAX_ITERS=... etc.)")
    parser.add_argument("--results", help="results folder for report/graphs/compare/publish (default: the newest)")
    parser.add_argument("--against", help="compare: a second results folder, shown side by side")
    parser.add_argument("--name", help="publish: the name of the key_results/<date>_<name>/ folder")
    parser.add_argument("--run", help="export, surgery, sweep: the run folder whose checkpoint to use; rerun: the "
                                      "run to train again from its spec.json")
    parser.add_argument("--format", default="harness", help="export: harness (default) or hf (transformers)")
    parser.add_argument("--sparse", default="dense", help="export: dense (default) or compressed (values + mask)")
    parser.add_argument("--quant", help="export: none (default) or int8 (torchao, Linear weights); sweep: int8 adds "
                                        "each row after int8")
    parser.add_argument("--tasks", help="eval: lm-eval task names or task YAML files, comma-separated")
    parser.add_argument("--limit", type=int, help="eval: at most this many examples per task (a quick look)")
    parser.add_argument("--hf", help="import: a transformers GPT-2 folder (config.json, model.safetensors)")
    parser.add_argument("--strict", action="store_true", help="rerun: exit 1 when the rerun differs")
    parser.add_argument("--fraction", help="surgery: share of each layer's structures to remove (0 < f < 1)")
    parser.add_argument("--structure", help="surgery: all, heads, neurons, channels, units or blocks")
    for name, what in (("sparsities", "percent, e.g. 30,50,70,90"), ("metrics", "magnitude,gradient-sensitivity,..."),
                       ("patterns", "unstructured,2:4,structured"), ("calibration", "training batches for the "
                                                                                    "gradient and activation metrics"),
                       ("tolerance", "points of accuracy or percent of perplexity"),
                       ("layers", "y: also each layer pruned alone (writes sweep/layers.json)")):
        parser.add_argument(f"--{name}", help=f"sweep: {what}")
    parser.add_argument("--gpus", help="dry-run/hwinfo: plan for made-up GPUs instead of the ones here, "
                                       "COUNTx NAME:TOTAL_GIB[:FREE_GIB] (make dry-run GPUS=\"1x NVIDIA A10G:24:8\"); "
                                       "with the Slurm executor, run/continue: the GPUs of one compute node")
    parser.add_argument("--executor", help="run, continue, dry-run: local or slurm for this invocation")
    parser.add_argument("--only", help="run, continue, dry-run, hwinfo: only the runs whose names match these "
                                       "comma-separated globs (make ONLY='*_adamw_*')")
    return parser.parse_args(argv)


def _overrides(pairs: list[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise HarnessError(f"override {pair!r} is not SYMBOL=VALUE")
        if value != "":  # an empty make variable means "not given"
            result[name.removeprefix("CONFIG_")] = value
    return result


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        command = os.environ.get("HARNESS_COMMAND") or " ".join(["python -m lib.cli"] + [shlex.quote(a) for a in argv])
        return _dispatch(args, command.strip())
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the last net under the checks that name the fix: still one line, with the path
        from lib.core.files import READ_ONLY, read_only_line

        where = exc.filename or "a file"
        text = read_only_line(where, exc) if exc.errno in READ_ONLY else f"{where}: {exc.strerror or exc}"
        print(f"error: {text}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, command: str) -> int:
    from lib import config as config_mod
    from lib import hardware, matrix
    from lib.matrix.executors import build_executor

    if args.gpus and args.command not in ("dry-run", "hwinfo", "run", "continue"):
        raise HarnessError(f"GPUS={args.gpus!r} describes made-up GPUs for `make dry-run` and `make hwinfo` only; "
                           f"drop it to {args.command}")
    if args.command in ("report", "graphs", "compare", "publish", "status"):
        return _results_command(args)
    if args.command in ("export", "eval", "surgery", "sweep") and args.run:  # each writes into the run folder
        _writable(Path(args.run))
    if args.command == "export":
        return _export(args.run, args.format, args.sparse, args.quant or "none")
    if args.command == "import":
        return _import(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "surgery":
        return _surgery(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "rerun":
        return _rerun(args, command)
    config = config_mod.load(args.config, _overrides(args.set))
    settings = dataclasses.replace(config.executor, name=args.executor) if args.executor else config.executor
    if args.gpus and args.command not in ("dry-run", "hwinfo") and settings.name != "slurm":
        raise HarnessError(f"GPUS={args.gpus!r} describes made-up GPUs for `make dry-run` and `make hwinfo` "
                           f"(and the compute nodes of the Slurm executor) only; drop it to {args.command} on the "
                           f"devices here")
    if args.command == "check":
        print(f"{args.config}: ok ({len(matrix.expand(config))} run(s))")
        return 0
    if args.command == "prepare-data":
        return _prepare_data(config)
    devices = hardware.detect()
    if args.gpus:
        devices = hardware.made_up(args.gpus, devices.cpu_cores)
    executor = build_executor(settings, devices.count if args.gpus else None)
    if args.command == "continue":
        folder = _writable(Path(args.results) if args.results else matrix.newest_unfinished(config.results_dir))
        runs = matrix.run_folder(folder, config.jobs, only_unfinished=True, executor=executor, only=args.only or "")
        if args.only:  # the verdict is on the runs asked for; the folder's summary still lists them all
            chosen = set(matrix.select(matrix.run_names(folder), args.only))
            runs = [r for r in runs if r["name"] in chosen]
        return _finish(folder, runs)
    specs = matrix.expand(config, devices)
    if args.only:  # a cell of the matrix: its name, plan and folder are exactly what the whole matrix gives it
        chosen = set(matrix.select([s.name for s in specs], args.only))
        specs = [s for s in specs if s.name in chosen]
    if args.command in ("dry-run", "hwinfo"):
        if args.command == "hwinfo":
            print(f"{'made up (GPUS=)' if args.gpus else 'detected'}:\n{devices.describe()}\n")
        print(matrix.dry_run_table(specs))
        print("\n".join(matrix.plan_lines(specs)))
        if executor.name == "slurm":
            print("\n".join(_sbatch_lines(executor, specs, config)))
        print(f"{len(specs)} run(s); nothing trained ({args.command})")
        return 0
    if executor.name == "slurm":
        executor.check(specs)  # before the folder exists: a refusal leaves nothing behind
    folder = matrix.create_results_folder(config, specs, command)
    return _finish(folder, matrix.run_folder(folder, config.jobs, executor=executor))


def _sbatch_lines(executor: Any, specs: list, config: Any) -> list[str]:
    """Each run's sbatch parameters (`make dry-run` with the Slurm executor)."""
    from lib.matrix.executors.slurm import require_slurm

    if executor.node_gpus is not None:  # GPUS= describes the nodes: the same check `make` makes
        executor.check_gpus(specs)
    executor.warn_time(specs)
    try:
        require_slurm()
    except HarnessError as exc:  # the preview is still useful, for a cluster elsewhere
        print(f"warning: {exc}")
    lines = []
    for spec in specs:
        folder = Path(config.results_dir) / "<folder>" / spec.name / "slurm"
        lines += [f"sbatch for {spec.name}:"] + [f"  {line}" for line in executor.sbatch_lines(spec, folder)]
    return lines


def _finish(folder: Path, runs: list[dict]) -> int:
    if not runs:  # recorded elsewhere: jobs submitted and not waited for, or a worker node of a multi-node run
        print(f"results: {folder} (recorded when the runs end; `make status` shows them)")
        return 0
    statuses = ("ok", "diverged", "failed", "unreadable", "stopped", "cut", "running", "queued", "incomplete")
    counts = {s: sum(r["status"] == s for r in runs) for s in statuses}  # the words `make status` uses
    print(f"results: {folder}")
    report = folder / "report.md"
    print(", ".join(f"{counts[s]} {s}" for s in statuses if counts[s] or s in statuses[:3]) + f"; report: {report}")
    return 1 if counts["failed"] or counts["unreadable"] else 0


def _export(run: str | None, fmt: str, sparse: str, quant: str) -> int:
    from lib.checkpoint.export import export
    from lib.checkpoint.versions import LATEST
    from lib.core.spec import run_spec

    if not run:
        raise HarnessError("export needs a run folder: `make export RUN=results/<folder>/<run>`")
    run_spec(Path(run))  # one line when it is not a run folder
    out = export(Path(run), fmt, sparse, quant)
    weights = "model.compressed.safetensors" if sparse == "compressed" else "model.safetensors"
    also = (", hf/ (transformers)" if fmt == "hf" else "") + (", int8 Linear weights" if quant == "int8" else "")
    print(f"exported {run} as {out}/ ({weights}, model_card.json{also}); {out.parent / LATEST} names it")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lib.core.spec import run_spec
    from lib.results import lmeval

    if not args.run:
        raise HarnessError("eval needs a run folder: `make eval RUN=results/<folder>/<run> TASKS=<tasks>`")
    run_spec(Path(args.run))  # one line when it is not a run folder
    lmeval.evaluate(Path(args.run), args.tasks or "", args.limit)
    print(f"wrote {Path(args.run) / 'eval' / 'lm_eval.json'} and lm_eval.md")
    return 0


def _import(args: argparse.Namespace) -> int:
    """`make import HF=<dir>`: load the folder as the first GPT-2 run of .config would start from it (every
    check of gpt2/hf.py); the Makefile then sets CONFIG_GPT2_INIT_HF."""
    from lib import config as config_mod
    from lib import matrix
    from lib.core.task import get_task

    if not args.hf:
        raise HarnessError("import needs a folder: `make import HF=<transformers GPT-2 folder>`")
    folder = Path(args.hf).resolve()
    if not folder.is_dir():
        raise HarnessError(f"HF={args.hf}: no such folder")
    specs = [s for s in matrix.expand(config_mod.load(args.config, _overrides(args.set))) if s.model == "gpt2"]
    if not specs:
        raise HarnessError(f"{args.config} trains no GPT-2 model, the only family transformers weights can start; "
                           f"write a GPT-2 config first (`make defconfig-gpt2-tiny-cpu`)")
    spec = dataclasses.replace(specs[0], model_options={**specs[0].model_options, "init_hf": str(folder)})
    state = get_task("gpt2").initial_state(spec)
    size = spec.model_options.get("size")
    print(f"{folder}: a GPT-2 {size} of {sum(t.numel() for k, t in state.items() if k != 'lm_head.weight'):,} "
          f"parameters that fits .config")
    return 0


def _surgery(args: argparse.Namespace) -> int:
    from lib.surgery.command import operate

    if not args.run:
        raise HarnessError("surgery needs a run folder: `make surgery RUN=results/<folder>/<run> [FRACTION=0.3]`")
    operate(Path(args.run), args.fraction, args.structure)
    return 0


def _rerun(args: argparse.Namespace, command: str) -> int:
    from lib.matrix.rerun import rerun

    if not args.run:
        raise HarnessError("rerun needs RUN=<run folder>, e.g. make rerun RUN=key_results/<publication>/<run>")
    return rerun(Path(args.run), _overrides(args.set).get("RESULTS_DIR", "results"), command, args.strict)


def _sweep(args: argparse.Namespace) -> int:
    from lib.sweep.oneshot import sweep_results, sweep_run

    given = {"SPARSITIES": args.sparsities, "METRICS": args.metrics, "PATTERNS": args.patterns,
             "CALIBRATION": args.calibration, "TOLERANCE": args.tolerance, "QUANT": args.quant,
             "LAYERS": args.layers}
    if args.run and args.results:
        raise HarnessError("sweep takes RUN=<run dir> or RESULTS=<results dir>, not both")
    if args.run:
        sweep_run(Path(args.run), given)
    elif args.results:
        sweep_results(_writable(_results_folder(args)), given)
    else:
        raise HarnessError("sweep needs a run or a results folder: `make sweep RUN=results/<folder>/<run>` or "
                           "`make sweep RESULTS=results/<folder>`")
    return 0


def _results_command(args: argparse.Namespace) -> int:
    """report, graphs, compare and publish: read a results folder, train nothing."""
    from lib import matrix
    from lib.results import compare, plots, publish

    if args.command == "publish" and not args.name:
        raise HarnessError("publish needs a name: `make publish NAME=<name> [RESULTS=dir]`")
    folder = _results_folder(args)
    if args.command == "status":
        from lib.matrix.executors.status import table

        print(table(folder, matrix.run_names(folder)))
        return 0
    if args.command in ("report", "graphs"):
        _writable(folder)
    print(f"{args.command}: {folder}", flush=True)
    if args.command == "report":
        runs = matrix.write_summary(folder)
        print(f"wrote {folder / 'summary.json'}, {folder / 'graphs'}/ and {folder / 'report.md'}")
        unreadable = [r for r in runs if r["status"] == "unreadable"]
        for r in unreadable:
            print(f"error: {r['name']}: {r['error']}", file=sys.stderr)
        return 1 if unreadable else 0
    if args.command == "compare":
        print(compare.compare(folder, Path(args.against) if args.against else None), end="")
    elif args.command == "publish":
        print(f"published {folder} to {publish.publish(folder, args.name)}")
    else:
        manifest = plots.write_graphs(folder)
        for g in manifest["graphs"]:
            print(f"wrote {folder / g['file']}")
        for g in manifest["skipped"]:
            print(f"skipped {g['graph']} ({g['model']}): {g['reason']}")
    return 0


def _writable(folder: Path) -> Path:
    """``folder``, once it is known to be writable (one line otherwise); a missing one is left to its command."""
    from lib.core.files import require_writable

    if folder.is_dir():
        require_writable(folder)
    return folder


def _results_folder(args: argparse.Namespace) -> Path:
    """RESULTS=<dir> if given, else the newest folder (by creation stamp) under RESULTS_DIR (or .config's)."""
    from lib.matrix import _absolute
    from lib.results import newest_folder

    if args.results:
        folder = Path(args.results)
        if not (folder / "matrix.json").is_file() and not (folder / "summary.json").is_file():
            raise HarnessError(f"{folder}: not a results folder (no matrix.json or summary.json); "
                               f"give RESULTS=<dir> of a folder made by `make`")
        return folder
    results_dir = _overrides(args.set).get("RESULTS_DIR")
    if results_dir is None:
        results_dir = _configured_results_dir(args.config)
    return newest_folder(Path(_absolute(results_dir)))


def _configured_results_dir(config_path: str) -> str:
    """CONFIG_RESULTS_DIR of the .config; the Kconfig default ("results") when there is no .config yet."""
    from lib import config as config_mod

    if not Path(config_path).exists():
        print(f"({config_path} not found: looking in results/)", flush=True)
        return "results"
    return config_mod.load(config_path).results_dir


def _prepare_data(config: object) -> int:
    from lib import matrix
    from lib.core.task import get_task

    done = set()
    for spec in matrix.expand(config):
        key = (spec.model, tuple(sorted(spec.model_options.items())))
        if key not in done:
            done.add(key)
            message = get_task(spec.model).fetch_data(spec)
            print(f"{spec.model}: {message or 'data ready'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
