"""`make gpu-check` (scripts/gpu_check.py, scripts/gpucheck/): refusals, the part runner, the record.

The real parts run in `make test` as `make gpu-check DRY=1` (their set-up on the CPU); here the
runner is driven with small made-up parts: one that is fine, one over its budget that started a
process of its own, one that raises, one that dies without an answer, one that skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT

sys.path.insert(0, str(ROOT / "scripts"))

from gpucheck import PARTS, TOTAL_BUDGET_S, Part, box, runner  # noqa: E402


def load_cli():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAKES = {
    "fake_ok": "from gpucheck import result\n"
               "def run(ctx):\n"
               "    assert ctx.dry and ctx.device == 'cpu' and ctx.work.is_dir()\n"
               "    (ctx.work / 'weights.pt').write_bytes(b'x' * 100)\n"
               "    return result('ok', '', {'answer': 42}, [['answer', 42]])\n",
    "fake_slow": "import subprocess, time\n"
                 "def run(ctx):\n"
                 "    child = subprocess.Popen(['sleep', '600'])\n"
                 "    (ctx.work / 'grandchild.pid').write_text(str(child.pid))\n"
                 "    time.sleep(600)\n",
    "fake_raises": "def run(ctx):\n    raise ValueError('boom at step 3')\n",
    "fake_exits": "import os\ndef run(ctx):\n    os._exit(9)\n",
    "fake_old_torch": "def run(ctx):\n    raise AttributeError(\"module 'torch.sparse' has no attribute "
                      "'to_sparse_semi_structured'\")\n",
    "fake_skips": "from gpucheck import result\n"
                  "def run(ctx):\n    return result('skipped', 'compute capability 7.5: no sparse tensor cores')\n",
}


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Part, ...]:
    for name, code in FAKES.items():
        (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tuple(Part(name.removeprefix("fake_"), i, f"made-up part {name}", 60, 3 if name == "fake_slow" else 60,
                      module=name) for i, name in enumerate(FAKES))


def test_each_part_gets_its_status_and_a_bad_one_never_stops_the_others(fake_parts, tmp_path: Path) -> None:
    out = tmp_path / "check"
    record = runner.run_all(out, True, [], {"stamp": "x", "commit": "abc"}, parts=fake_parts, say=lambda *a, **k: None)
    by_key = {p["part"]: p for p in record["parts"]}
    assert [p["part"] for p in record["parts"]] == ["ok", "slow", "raises", "exits", "old_torch", "skips"]
    assert by_key["ok"]["status"] == "ok" and by_key["ok"]["results"] == {"answer": 42}
    assert by_key["slow"]["status"] == "timeout" and "over its 3 s budget" in by_key["slow"]["reason"]
    assert by_key["raises"]["status"] == "failed" and by_key["raises"]["reason"] == "ValueError: boom at step 3"
    assert by_key["exits"]["status"] == "failed" and by_key["exits"]["reason"].startswith("exit 9 without a result")
    assert by_key["skips"]["status"] == "skipped" and "7.5" in by_key["skips"]["reason"]
    assert by_key["old_torch"]["status"] == "skipped"
    assert by_key["old_torch"]["reason"] == (f"torch {torch.__version__} lacks what this part needs: module "
                                             f"'torch.sparse' has no attribute 'to_sparse_semi_structured'")
    assert record["status"] == "failed"
    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(json.dumps(record))
    table = (out / "gpu_check.md").read_text()
    assert "| 1 | made-up part fake_slow | timeout |" in table and "| answer | 42 |" in table
    assert not (out / "ok" / "weights.pt").exists()  # checkpoints a part leaves are dropped
    grandchild = int((out / "slow" / "grandchild.pid").read_text())
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "a part over its budget is killed with everything it started"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_only_ok_and_skipped_parts_make_a_passing_check(fake_parts, tmp_path: Path) -> None:
    record = runner.run_all(tmp_path / "check", True, ["ok", "skips"], {}, parts=fake_parts, say=lambda *a, **k: None)
    assert [p["status"] for p in record["parts"]] == ["ok", "skipped"] and record["status"] == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([PY, "scripts/gpu_check.py", "--results", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no CUDA GPU here" in done.stderr
    assert "make gpu-check DRY=1" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_cpu_build_of_torch_beside_a_gpu_is_exit_3_naming_python(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(box, "gpu_on_machine", lambda: "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)")
    assert load_cli().main(["--results", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a CPU build" in err and "NVIDIA H100" in err
    assert "make gpu-check PYTHON=/path/to/python3" in err
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build that cannot reach the GPU: exit 2
    assert load_cli().main(["--results", str(tmp_path)]) == 2
    assert "cannot use the GPU here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_part_in_only_is_one_line(capsys) -> None:
    assert load_cli().main(["--dry", "--parts", "box,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: PARTS='box,nope': no part named nope; the parts are {', '.join(p.key for p in PARTS)}"


def test_the_record_carries_the_commit_and_versions(tmp_path: Path) -> None:
    done = subprocess.run([PY, "scripts/gpu_check.py", "--dry", "--parts", "box", "--results", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(next(tmp_path.glob("gpu_check_dry_*/gpu_check.json")).read_text())
    assert record["dry"] and record["status"] == "ok" and record["commit"] not in ("", None)
    assert record["versions"]["torch"] == torch.__version__
    assert record["parts"][0]["results"]["torch"] == torch.__version__


def test_the_budgets_add_up_to_eight_minutes_on_one_h100() -> None:
    assert TOTAL_BUDGET_S == 480 == sum(p.budget_s for p in PARTS)
    assert [p.number for p in PARTS] == list(range(8))


def test_a_part_needing_more_free_gpu_memory_than_there_is_is_skipped_with_the_figures(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(5.5 * 2**30), 80 * 2**30))
    entry = runner._gate(24.0, dry=False)
    assert entry["status"] == "skipped"
    assert entry["reason"] == "needs 24 GiB of free GPU memory; 5.5 GiB of 80.0 GiB are free"
    assert runner._gate(4.0, dry=False) is None and runner._gate(24.0, dry=True) is None


def test_deterministic_runs_are_strict_and_set_cublas_before_cuda(tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import tiny_spec, trained_run

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        trained_run(tmp_path, tiny_spec("strict", max_iters=2))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
