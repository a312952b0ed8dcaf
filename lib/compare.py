"""Compare view: rank methods at each sparsity, or set two results folders side by side (Markdown).

The number compared is the test metric at the best-by-validation checkpoint,
mean over the seeds that finished ok. Significance rule (stated in the output):
a difference is "not significant" when |Δ mean| is smaller than the larger of
the two seed standard deviations (sample std, n-1); with fewer than two seeds on
either side it is "n/a (1 seed)", since the seeds' spread is unknown.
"""

from __future__ import annotations

from pathlib import Path

from lib.errors import HarnessError
from lib.results import Folder, Metric, Stat, groups, load, metric_of, test_stat

RULE = ("Significance: a difference is *not significant* when |Δ mean| < max(std of the two), "
        "std being the sample std over seeds; *n/a* when either side has a single seed. "
        "Methods with the same mean share a rank, marked = (1=, 1=, 3); a tie for first says *tie* in the last "
        "column.")
TIE = "tie (same mean)"


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


def significance(a: Stat, b: Stat) -> str:
    """'significant', 'not significant' or 'n/a (1 seed)' for the difference of two means."""
    if a.std is None or b.std is None:
        return "n/a (1 seed)"
    return "not significant" if abs(a.mean - b.mean) < max(a.std, b.std) else "significant"


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
    return f"## {model}: test {metric.name}{unit} at the best-val checkpoint, {metric.direction}"


def _stats(runs: list) -> dict[tuple[str, float], tuple[Stat | None, int]]:
    """(method, target) -> (test stat over ok seeds, number of runs)."""
    return {(method, target): (test_stat(members), len(members))
            for (_, method, target), members in groups(runs).items()}


def _fmt(s: Stat | None, total: int) -> str:
    return f"{s.text()} (n={s.n}/{total})" if s else f"- (n=0/{total})"


def _ranking(data: Folder) -> str:
    lines = [f"# Compare: {data.path.name}", ""]
    if not data.runs:
        return "\n".join(lines + ["No runs in this folder: nothing to compare."]) + "\n"
    for model, runs in data.models().items():
        metric = metric_of(runs)
        lines += [_header(metric, model), "",
                  "| sparsity | rank | optimizer/method | test mean ± std (seeds) | Δ vs #1 | vs #1 |",
                  "|---|---|---|---|---|---|"]
        stats = _stats(runs)
        for target in sorted({t for _, t in stats}):
            at = [(m, s, n) for (m, t), (s, n) in stats.items() if t == target]
            ranked = sorted((x for x in at if x[1]), key=lambda x: x[1].mean,
                            reverse=metric.higher_is_better if metric else True)
            leader = ranked[0][1] if ranked else None
            for i, ((method, s, n), rank) in enumerate(zip(ranked, ranks([x[1].mean for x in ranked]), strict=True)):
                delta = "-" if i == 0 else f"{s.mean - leader.mean:+.2f}"
                mark = TIE if rank == "1=" else "-" if i == 0 else significance(leader, s)
                lines.append(f"| {target:.0%} | {rank} | {method} | {_fmt(s, n)} | {delta} | {mark} |")
            for method, _, n in (x for x in at if not x[1]):
                lines.append(f"| {target:.0%} | - | {method} | {_fmt(None, n)} | - | no finished run |")
        lines.append("")
    lines += [RULE, ""] + _notes(data)
    return "\n".join(lines) + "\n"


def _side_by_side(a: Folder, b: Folder) -> str:
    lines = [f"# Compare: A = {a.path.name} vs B = {b.path.name}", ""]
    models = list(dict.fromkeys([*a.models(), *b.models()]))
    if not models:
        return "\n".join(lines + ["No runs in either folder: nothing to compare."]) + "\n"
    for model in models:
        runs_a, runs_b = a.models().get(model, []), b.models().get(model, [])
        metric = metric_of(runs_a) or metric_of(runs_b)
        lines += [_header(metric, model), "",
                  "| sparsity | optimizer/method | A | B | Δ (B − A) | better | significance |",
                  "|---|---|---|---|---|---|---|"]
        sa, sb = _stats(runs_a), _stats(runs_b)
        for key in sorted(set(sa) | set(sb), key=lambda k: (k[1], k[0])):
            method, target = key
            (xa, na), (xb, nb) = sa.get(key, (None, 0)), sb.get(key, (None, 0))
            if xa and xb:
                delta = xb.mean - xa.mean
                b_better = (delta > 0) == (metric is None or metric.higher_is_better)
                better = "=" if tied(xa.mean, xb.mean) else "B" if b_better else "A"
                row = [f"{delta:+.2f}", better, significance(xa, xb)]
            else:
                row = ["-", "-", "only in A" if key not in sb else "only in B" if key not in sa else "no finished run"]
            lines.append(f"| {target:.0%} | {method} | {_fmt(xa, na)} | {_fmt(xb, nb)} | " + " | ".join(row) + " |")
        lines.append("")
    lines += [RULE, ""] + _notes(a, "A: ") + _notes(b, "B: ")
    return "\n".join(lines) + "\n"


def _notes(data: Folder, prefix: str = "") -> list[str]:
    if not data.notes:
        return []
    return [f"Missing data ({prefix}{data.path.name}):", ""] + [f"- {n}" for n in data.notes] + [""]
