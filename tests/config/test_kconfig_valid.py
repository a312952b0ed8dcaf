"""Every config Kconfig lets a user reach is a valid experiment: randconfig, allyesconfig, allnoconfig.

The rules live in the Kconfig dependencies (state pruning only with AdamWPrune, each axis keeps a
member, ...), so these tests check the Kconfig tree, not a list of Python special cases.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib import config, matrix
from lib.config.kconf import open_kconfig
from lib.hardware import Devices
from lib.train import run as run_mod
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from kconfig_tool import write_random  # noqa: E402

CPU = Devices("cpu", cpu_cores=2)


def _dry_run(path: Path, overrides: dict[str, str] | None = None) -> list:
    """What `make dry-run` does, in-process on a made-up 2-core CPU machine."""
    specs = matrix.expand(config.load(path, overrides), CPU)
    assert specs and matrix.dry_run_table(specs) and matrix.plan_lines(specs)
    return specs


def test_200_random_configs_load_and_plan(tmp_path):
    path = tmp_path / ".config"
    for seed in range(200):
        write_random(seed, path)
        try:
            _dry_run(path)
        except Exception as exc:  # name the seed, so `make randconfig KCONFIG_SEED=N` repeats it
            pytest.fail(f"KCONFIG_SEED={seed}: {exc}")


def test_40_random_configs_dry_run_where_there_is_no_slurm(tmp_path, monkeypatch, capsys):
    """randconfig leaves the executor at its default (local), as it does the hardware: `make dry-run` of any
    random config works on a machine without Slurm."""
    from lib import cli

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch, srun, squeue or sinfo
    monkeypatch.setattr("lib.hardware.detect", lambda: CPU)  # the made-up 2-core machine of the other tests
    path = tmp_path / ".config"
    for seed in range(40):
        write_random(seed, path)
        assert "CONFIG_EXECUTOR_LOCAL=y" in path.read_text(), f"KCONFIG_SEED={seed} drew another executor"
        assert cli.main(["dry-run", "--config", str(path)]) == 0, f"KCONFIG_SEED={seed}: {capsys.readouterr().err}"
    assert "nothing trained (dry-run)" in capsys.readouterr().out


@pytest.mark.parametrize("tool", ["allyesconfig", "allnoconfig"])
def test_all_yes_and_all_no_configs_load_and_plan(tmp_path, tool):
    path = tmp_path / ".config"
    env = {"KCONFIG_CONFIG": str(path), "srctree": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([str(Path(sys.executable).parent / tool), "Kconfig"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    specs = _dry_run(path)
    if tool == "allyesconfig":  # every model, optimizer, method and sparsity
        assert {s.model for s in specs} == {"lenet5", "gpt2", "resnet18", "resnet50"}
        assert {s.prune.method for s in specs} == {"none", "magnitude", "movement", "state", "nm"}


# Only LeNet-5 on the shipped 5,000 digits trains offline; the rest of each random config (optimizer,
# its hyper-parameters, pruning method, schedule, sparsities) is kept as drawn.
OFFLINE = {"MODEL_MULTIPLE": "n", "MODEL_LENET5": "y", "LENET5_DATASET_MNIST5K": "y", "MAX_ITERS": "3",
           "SEEDS": "1", "TRACKER_NONE": "y", "DATA_DIR": str(ROOT / "data")}


def _offline(path: Path) -> None:
    """Set OFFLINE in the random config the way menuconfig would (lines it makes void disappear)."""
    kconf = open_kconfig()
    kconf.load_config(str(path))
    for name, value in OFFLINE.items():
        kconf.syms[name].set_value(value)
    kconf.write_config(str(path), save_old=False)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_configs_train_three_steps(tmp_path, seed):
    path = tmp_path / ".config"
    write_random(seed, path)
    _offline(path)
    specs = _dry_run(path)
    picked = {(s.optim.name, s.prune.method): s for s in specs}  # one run per optimizer and method
    for spec in list(picked.values())[:4]:
        spec = dataclasses.replace(spec, hardware=dataclasses.replace(spec.hardware, threads=1))
        run_dir = tmp_path / spec.name
        run_dir.mkdir()
        spec.write(run_dir / "spec.json")
        run_mod.run(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] in ("ok", "diverged"), f"KCONFIG_SEED={seed} {spec.name}: {summary}"
        assert summary["steps"]["done"] == 3, summary


def test_defconfig_refuses_an_unknown_choice_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kconfiglib would drop CONFIG_SPAM_FORM_PAPER=y and write the default form; make defconfig-x must refuse."""
    import kconfig_tool

    from lib.core.errors import HarnessError

    (tmp_path / "bad").write_text("CONFIG_OPTIMIZER_ADAMWSPAM=y\nCONFIG_SPAM_FORM_PAPER=y\n")
    monkeypatch.setattr(kconfig_tool, "DEFCONFIGS", tmp_path)
    monkeypatch.setattr(kconfig_tool, "target", lambda: tmp_path / ".config")
    with pytest.raises(HarnessError, match=r"^defconfigs/bad: CONFIG_SPAM_FORM_PAPER=y: 'paper' is not a "
                                           r"CONFIG_SPAM_FORM value \(valid: released, knlp\)"):
        kconfig_tool.defconfig("bad")
    assert not (tmp_path / ".config").exists()
