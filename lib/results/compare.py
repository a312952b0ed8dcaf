"""Compare view: methods at each sparsity ranked by validation, or two results folders side by side (Markdown).

Selection is on validation only. Rows are ranked by the mean best-validation metric over the seeds that
finished ok; the test metric is only reported, as the value at each run's validation-chosen checkpoint.
Two groups of runs are the same method only when every setting that changes training agrees
(lib/spec.method_identity): groups that differ in any are never paired, and say in what. Every difference
printed carries a stated test (lib/results/stats.py): paired over shared seeds, Welch's t otherwise, or "no test
possible" with a single seed.
"""

from __future__ import annotations

from pathlib import Path

from lib.core.errors import HarnessError
from lib.results import Folder, Metric, Run, load, metric_of, stat
from lib.core.spec import identity_differences, method_identity
from lib.results.stats import RULE, compare_seeds

RANKING = ("Ranked by the mean best-validation metric (never by test); a tie shares a rank, marked = (1=, 1=, 3). "
           "The test columns are the values at each run's validation-chosen checkpoint.")


def tied(a: float, b: float) -> bool:
    """Equal means (up to float rounding): a tie, never a ranking."""
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def ranks(means: list[float]) -> list[str]:
    """Competition ranks of already-sorted means, a tie marked "=": [98, 98, 97] -> ["1=", "1=", "3"]."""
    result = []
    for mean in means:
        first = next(j for j, m in enumerate(means) if tied(m, mean))
        shared = sum(tied(m, mean) for m in means) > 1
        result.append(f"{first + 1}{'=' if shared else ''}")
    return result


class Group:
    """The runs of one method at one target sparsity (every seed)."""

    def __init__(self, label: str, target: float, runs: list[Run]) -> None:
        self.label, self.target, self.runs = label, target, runs
        self.identity = method_identity(runs[0].spec) if runs[0].spec else {}
        ok = [r for r in runs if r.status == "ok"]
        self.val = {r.seed: v for r in ok if (v := r.best_value()) is not None}
        self.test = {r.seed: v for r in ok if (v := r.test_value()) is not None}

    @property
    def dense_identity(self) -> dict:
        return {k: v for k, v in self.identity.items() if not k.startswith("prune.")}

    def cell(self, values: dict) -> str:
        s = stat(list(values.values()))
        return f"{s.text()} (n={s.n}/{len(self.runs)})" if s else f"- (n=0/{len(self.runs)})"


def method_groups(runs: list[Run]) -> list[Group]:
    """Runs grouped by method and target; runs of one label whose identities differ become separate groups, each
    label then naming the settings that set it apart."""
    by_key: dict[tuple[str, float], list[list[Run]]] = {}
    for run in runs:
        key = (run.method, round(run.target, 6))
        identity = method_identity(run.spec) if run.spec else {}
        for members in by_key.setdefault(key, []):
            if (method_identity(members[0].spec) if members[0].spec else {}) == identity:
                members.append(run)
                break
        else:
            by_key[key].append([run])
    result = []
    for (label, target), splits in by_key.items():
        groups = [Group(label, target, members) for members in splits]
        if len(groups) > 1:
            for g in groups:
                differs = [d.split(" ")[0] for other in groups if other is not g
                           for d in identity_differences(g.identity, other.identity)]
                g.label += " [" + ", ".join(f"{k}={g.identity.get(k)}" for k in dict.fromkeys(differs)) + "]"
        result += groups
    return result


def compare(folder: Path, against: Path | None = None) -> str:
    """The Markdown compare view of ``folder`` (ranking), or of ``folder`` vs ``against`` (side by side)."""
    a = _load(folder)
    if against is None:
        return _ranking(a)
    return _side_by_side(a, _load(against))


def _load(folder: Path) -> Folder:
    path = Path(folder)
    if not path.is_dir():
        raise HarnessError(f"{path} is not a folder; give a results folder (RESULTS=dir / AGAINST=dir)")
    return load(path)


def _header(metric: Metric | None, model: str) -> str:
    if metric is None:
        return f"## {model}: no metric recorded"
    unit = f" ({metric.unit})" if metric.unit else ""
    return f"## {model}: {metric.name}{unit}, {metric.direction}"


def by_validation(groups: list[Group], metric: Metric | None) -> list[Group]:
    """Groups with a finished run, best mean validation metric first."""
    sign = -1 if metric is None or metric.higher_is_better else 1
    return sorted((g for g in groups if g.val), key=lambda g: sign * stat(list(g.val.values())).mean)


def _dense_for(group: Group, groups: list[Group]) -> Group | None:
    """The dense run of the same method but for its pruning (same optimizer, schedule of training, ...)."""
    return next((g for g in groups if g.identity.get("prune.method") == "none" and g is not group
                 and g.dense_identity == group.dense_identity), None)


def _ranking(data: Folder) -> str:
    lines = [f"# Compare: {data.path.name}", ""]
    if not data.runs:
        return "\n".join(lines + ["No runs in this folder: nothing to compare."]) + "\n"
    for model, runs in data.models().items():
        metric = metric_of(runs)
        groups = method_groups(runs)
        lines += [_header(metric, model), "",
                  "| sparsity | rank (val) | method | best val mean ± std | test at best val | test vs #1 | "
                  "test vs dense |", "|---|---|---|---|---|---|---|"]
        for target in sorted({g.target for g in groups}):
            at = [g for g in groups if g.target == target]
            ranked = by_validation(at, metric)
            leader = ranked[0] if ranked else None
            means = [stat(list(g.val.values())).mean for g in ranked]
            for g, rank in zip(ranked, ranks(means), strict=True):
                vs_leader = "-" if g is leader else compare_seeds(leader.test, g.test).text()
                dense = _dense_for(g, groups)
                vs_dense = ("-" if g.identity.get("prune.method") == "none" else
                            compare_seeds(dense.test, g.test).text() if dense else "no dense run to compare")
                lines.append(f"| {target:.0%} | {rank} | {g.label} | {g.cell(g.val)} | {g.cell(g.test)} | "
                             f"{vs_leader} | {vs_dense} |")
            for g in (g for g in at if not g.val):
                lines.append(f"| {target:.0%} | - | {g.label} | {g.cell(g.val)} | - | no finished run | - |")
        lines.append("")
    lines += [RANKING, "", RULE, ""] + _notes(data)
    return "\n".join(lines) + "\n"


def _side_by_side(a: Folder, b: Folder) -> str:
    lines = [f"# Compare: A = {a.path.name} vs B = {b.path.name}", ""]
    models = list(dict.fromkeys([*a.models(), *b.models()]))
    if not models:
        return "\n".join(lines + ["No runs in either folder: nothing to compare."]) + "\n"
    for model in models:
        runs_a, runs_b = a.models().get(model, []), b.models().get(model, [])
        metric = metric_of(runs_a) or metric_of(runs_b)
        lines += [_header(metric, model), "", "| sparsity | method | A: val / test at best val | "
                  "B: val / test at best val | test B − A |", "|---|---|---|---|---|"]
        ga = {(g.label, g.target): g for g in method_groups(runs_a)}
        gb = {(g.label, g.target): g for g in method_groups(runs_b)}
        for key in sorted(set(ga) | set(gb), key=lambda k: (k[1], k[0])):
            x, y = ga.get(key), gb.get(key)
            cells = [f"{g.cell(g.val)} / {g.cell(g.test)}" if g else "-" for g in (x, y)]
            lines.append(f"| {key[1]:.0%} | {key[0]} | {cells[0]} | {cells[1]} | {_pair(x, y)} |")
        lines.append("")
    lines += ["Groups are paired only when every setting that changes training agrees; the test is on the test "
              "metric at each run's validation-chosen checkpoint.", "", RULE, ""]
    return "\n".join(lines + _notes(a, "A: ") + _notes(b, "B: ")) + "\n"


def _pair(x: Group | None, y: Group | None) -> str:
    if x is None or y is None:
        return "unpaired: only in " + ("B" if x is None else "A")
    differs = identity_differences(x.identity, y.identity)
    if differs:
        more = f" (+{len(differs) - 2} more)" if len(differs) > 2 else ""
        return f"unpaired: another method ({'; '.join(differs[:2])}{more})"
    return compare_seeds(x.test, y.test).text()


def _notes(data: Folder, prefix: str = "") -> list[str]:
    if not data.notes:
        return []
    return [f"Missing data ({prefix}{data.path.name}):", ""] + [f"- {n}" for n in data.notes] + [""]
