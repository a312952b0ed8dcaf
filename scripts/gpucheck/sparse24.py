"""Part 4: 2:4 on the device. torch's semi-structured sparse kernels against dense, in float16 and
bfloat16, on GPT-2 124M's four linear shapes (scripts/bench_nm.py), and one `make sweep` 2:4 row on a
tiny GPT checkpoint this part trains itself (the sweep times that row on the sparse kernels too).

Needs compute capability 8.0 or newer (sparse tensor cores); older GPUs skip it with that reason.
"""

from __future__ import annotations

from gpucheck import ROOT, Context, result

TOKENS, DRY_TOKENS = 8192, 64
REPEATS, DRY_REPEATS = 25, 2
TINY_RUN = {"CONFIG_COMPILE_OFF": "y", "CONFIG_MAX_ITERS": "30", "CONFIG_EVAL_INTERVAL": "15"}  # seconds on a GPU


def run(ctx: Context) -> dict:
    import bench_nm
    import torch

    kernels = not ctx.dry
    if kernels and torch.cuda.get_device_capability()[0] < 8:
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        return result("skipped", f"compute capability {cap}: torch's 2:4 sparse kernels need 8.0 or newer")
    device = torch.device(ctx.device)
    found: dict = {"kernels": {}, "sweep": None}
    rows = []
    dtypes = (torch.float16, torch.bfloat16) if kernels else (torch.float32,)
    for dtype in dtypes:
        measured = [bench_nm.measure(name, shape, DRY_TOKENS if ctx.dry else TOKENS,
                                     DRY_REPEATS if ctx.dry else REPEATS, device, kernels, dtype)
                    for name, shape in bench_nm.SHAPES.items()]
        block = sum(r["dense_ms"] for r in measured) / sum(r["nm_ms"] for r in measured)
        name = str(dtype).removeprefix("torch.")
        found["kernels"][name] = {"rows": measured, "block_speedup": block}
        per_layer = ", ".join(f"{r['layer']} {r['speedup']:.2f}x" for r in measured)
        kind = "semi-structured" if kernels else "masked dense (no sparse kernels on the CPU)"
        rows.append([f"2:4 {kind}, {name}", f"block {block:.2f}x ({per_layer}); largest |error| "
                                            f"{max(r['max_abs_error'] for r in measured):.2e}"])
    found["sweep"] = sweep_row(ctx)
    row = found["sweep"]
    speed = row.get("speed_sparse_kernels") or {}
    rows.append(["sweep 2:4 row (tiny GPT)", f"val perplexity {row['val']['perplexity']:.2f} at reached "
                                             f"{row['reached']:.3f}; sparse kernels: "
                                             f"{_speed(speed) if speed else 'not on this device'}"])
    return result("ok", "", found, rows)


def sweep_row(ctx: Context) -> dict:
    """Train a tiny GPT on the device (no compile: seconds), sweep its best checkpoint at 2:4 by magnitude."""
    from gpucheck.train import ON_CPU, specs, train_one
    from lib.sweep.oneshot import sweep_run

    extra = {"CONFIG_COMPILE_OFF": "y", **ON_CPU} if ctx.dry else TINY_RUN
    dense = [s for s in specs(ctx.work, True, ROOT / "data", extra) if s.pruning == "none"][0]
    run_dir, summary = train_one(dense, ctx.work, ctx.budget_s / 2, ctx.dry)
    if summary["status"] != "ok":
        raise RuntimeError(f"the tiny GPT run ended {summary['status']}: {summary.get('error')}")
    record = sweep_run(run_dir, {"PATTERNS": "2:4", "METRICS": "magnitude", "CALIBRATION": "0"},
                       say=lambda *a, **k: None)
    return next(r for r in record["rows"] if r.get("pattern") == "2:4")


def _speed(speed: dict) -> str:
    if "error" in speed:
        return f"failed: {speed['error']}"
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in speed.items()
                     if "speedup" in k or k == "converted_layers")
