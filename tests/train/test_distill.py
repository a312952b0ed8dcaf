"""CONFIG_DISTILL (lib/train/distill.py, lib/matrix/teachers.py, lib/config/distill.py): the loss against its
formula, teachers assigned and trained first in a matrix, the teacher untouched, and every bad input one line
(issue 32)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from lenet5.model import LeNet5
from lib import cli, config, matrix
from lib.core.errors import ConfigError, HarnessError
from lib.core.spec import RunSpec
from lib.core.task import get_task
from lib.hardware import Devices
from lib.matrix import teachers
from lib.results import load as load_results
from lib.train import distill
from tests.conftest import tiny_spec, trained_run

CPU = Devices("cpu", cpu_cores=2)
MATRIX = ('CONFIG_PRUNING_MULTIPLE=y\nCONFIG_PRUNING_ENABLE_NONE=y\nCONFIG_PRUNING_ENABLE_MAGNITUDE=y\n'
          'CONFIG_SPARSITY_MULTIPLE=y\nCONFIG_SPARSITY_ENABLE_50=n\nCONFIG_SPARSITY_ENABLE_70=n\nCONFIG_SEEDS=2\n'
          'CONFIG_DISTILL=y\nCONFIG_DISTILL_WEIGHT="0.7"\nCONFIG_DISTILL_TEMPERATURE="3"\n')


def test_the_loss_is_the_blend_of_cross_entropy_and_the_scaled_kl_term() -> None:
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    guide = torch.tensor([[1.0, 1.5, 0.0], [2.0, -1.0, 0.5]])
    targets = torch.tensor([0, 2])

    def softmax(row: list[float], t: float) -> list[float]:
        exp = [math.exp(v / t) for v in row]
        return [e / sum(exp) for e in exp]

    ce = sum(-math.log(softmax(row, 1.0)[y]) for row, y in zip(scores.tolist(), targets.tolist(), strict=True)) / 2
    t = 3.0
    kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax(g, t), softmax(s, t), strict=True))
             for g, s in zip(guide.tolist(), scores.tolist(), strict=True)) / 2
    for weight in (0.3, 1.0):
        got = float(distill.blended(scores, guide, targets, weight, t))
        assert got == pytest.approx((1 - weight) * ce + weight * t * t * kl, rel=1e-5)  # float32


def test_a_matrix_gives_each_pruned_run_its_seeds_dense_teacher_trained_first(make_config) -> None:
    specs = matrix.expand(config.load(make_config(MATRIX)), CPU)
    assert [s.name for s in specs] == ["lenet5_adamw_none_0_s1", "lenet5_adamw_none_0_s2",
                                       "lenet5_adamw_magnitude_90_s1", "lenet5_adamw_magnitude_90_s2"]
    assert [(s.train.distill_weight, s.train.distill_teacher) for s in specs] == [
        (0.0, ""), (0.0, ""), (0.7, "lenet5_adamw_none_0_s1"), (0.7, "lenet5_adamw_none_0_s2")]
    assert specs[2].train.distill_temperature == 3.0
    from lib.core.spec import method_identity  # both seeds are one method: the teacher's name is not part of it
    assert method_identity(specs[2].to_dict()) == method_identity(specs[3].to_dict())
    two = matrix.expand(config.load(make_config(MATRIX + "CONFIG_OPTIMIZER_MULTIPLE=y\nCONFIG_OPTIMIZER_ENABLE_SGD=y\n"
                                                "CONFIG_OPTIMIZER_ENABLE_ADAMW=y\n")), CPU)
    assert [s.prune.method for s in two] == ["none"] * 4 + ["magnitude"] * 4  # every teacher before any student
    assert {s.name: s.train.distill_teacher for s in two}["lenet5_sgd_magnitude_90_s2"] == "lenet5_sgd_none_0_s2"
    alone = [s for s in specs if s.prune.method != "none"]
    with pytest.raises(ConfigError, match="has no dense run of the same model, seed and optimizer settings"):
        teachers.assign([dataclasses.replace(alone[0], train=dataclasses.replace(alone[0].train,
                                                                                 distill_teacher=""))])


@pytest.mark.parametrize("line, message", [
    ('CONFIG_DISTILL_WEIGHT="0"\n', "CONFIG_DISTILL_WEIGHT"),
    ('CONFIG_DISTILL_WEIGHT="1.5"\n', "CONFIG_DISTILL_WEIGHT"),
    ('CONFIG_DISTILL_TEMPERATURE="0"\n', "CONFIG_DISTILL_TEMPERATURE"),
    ('CONFIG_DISTILL_TEACHER_PATH="/nowhere"\n', "is not a run folder"),
])
def test_bad_distillation_settings_are_one_line(make_config, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(make_config(MATRIX + line))


def test_distillation_is_offered_only_where_a_teacher_exists(make_config) -> None:
    with pytest.raises(ConfigError, match="CONFIG_DISTILL=y has no effect: it depends on"):
        config.load(make_config('CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.9"\n', "CONFIG_DISTILL=y\n"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("teacher"), tiny_spec("dense", max_iters=12))


def test_a_named_teacher_guides_the_run_and_stays_untouched(teacher: Path, tmp_path: Path, make_config) -> None:
    best = (teacher / "checkpoints" / "best.pt").read_bytes()
    plain = tiny_spec("plain", pruning="magnitude", sparsity=0.9, max_iters=12)
    guided = dataclasses.replace(plain, name="guided", train=dataclasses.replace(
        plain.train, distill_weight=0.5, distill_temperature=2.0, distill_teacher=str(teacher)))
    runs = [trained_run(tmp_path, spec) for spec in (plain, guided)]
    losses = [[json.loads(line)["loss"] for line in (r / "train.jsonl").read_text().splitlines()] for r in runs]
    assert losses[0][0] != losses[1][0]  # the first step's loss already carries the KL term
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["distill"] == {"teacher": str(teacher), "weight": 0.5,
                                                                 "temperature": 2.0}
    assert (teacher / "checkpoints" / "best.pt").read_bytes() == best
    gpt = tmp_path / "gpt"  # a teacher of another model, named in the config: one line before any run
    gpt.mkdir()
    (gpt / "spec.json").write_text(json.dumps({**json.loads((teacher / "spec.json").read_text()), "model": "gpt2"}))
    lines = 'CONFIG_PRUNING_MAGNITUDE=y\nCONFIG_TARGET_SPARSITY="0.9"\n' + f'CONFIG_DISTILL_TEACHER_PATH="{gpt}"\n'
    with pytest.raises(ConfigError, match="trained 'gpt2', but lenet5_adamw_magnitude_90 trains 'lenet5'"):
        matrix.expand(config.load(make_config(lines + "CONFIG_DISTILL=y\n")), CPU)


def test_a_teacher_of_other_classes_is_one_line_and_a_student_waits_for_its_teacher(teacher: Path,
                                                                                   tmp_path: Path) -> None:
    spec = RunSpec.read(teacher / "spec.json")
    task = get_task("lenet5")
    other = distill.Teacher(LeNet5(num_classes=5), 0.5, 2.0, teacher, 12)
    with pytest.raises(HarnessError, match="scores 5 classes .* this model 10"):
        distill.check_outputs(task, spec, task.build_model(spec), other, torch.device("cpu"))
    later = tmp_path / "later"
    later.mkdir()
    (later / "spec.json").write_text((teacher / "spec.json").read_text())
    lines: list[str] = []

    def finish(status: str) -> None:  # the teacher's own record, ended otherwise
        time.sleep(0.3)
        (later / "summary.json").write_text(json.dumps({**json.loads((teacher / "summary.json").read_text()),
                                                        "status": status, "error": "killed"}))

    student = dataclasses.replace(spec, train=dataclasses.replace(spec.train, distill_weight=0.5,
                                                                  distill_teacher=str(later)))
    threading.Thread(target=finish, args=("failed",)).start()
    with pytest.raises(HarnessError, match="ended failed, so this run has no teacher"):
        distill.load_teacher(task, student, tmp_path / "run", torch.device("cpu"), lines.append, poll_s=0.05)
    assert lines and lines[0].startswith("distillation: waiting for the teacher later")
    (later / "summary.json").write_text("{")  # written by hand, or cut short: not taken for an ending
    with pytest.raises(HarnessError, match=r"left an unusable summary.json \(truncated or not JSON\)"):
        distill.load_teacher(task, student, tmp_path / "run", torch.device("cpu"), lines.append, poll_s=0.05)


def test_the_plan_counts_the_teachers_weights_and_sharding_refuses_a_teacher() -> None:
    from lib import hardware
    from lib.hardware import memory
    from tests.hardware.test_hardware import settings
    from tests.hardware.test_parallel import A10GX8, xl

    spec = tiny_spec("student", pruning="magnitude", sparsity=0.9)
    taught = dataclasses.replace(spec, train=dataclasses.replace(spec.train, distill_weight=0.5, distill_teacher="t"))
    task = get_task("lenet5")
    plain, guided = (memory.estimate_footprint(task, s, "float32") for s in (spec, taught))
    assert guided.fixed - plain.fixed == memory.activation_profiles(task, spec).weights * 4  # fp32, no state
    assert guided.per_sample == plain.per_sample
    big = xl()
    with pytest.raises(ConfigError, match="distillation \\(CONFIG_DISTILL: the teacher is not sharded yet\\)"):
        hardware.plan(dataclasses.replace(big, train=dataclasses.replace(big.train, distill_weight=0.5)),
                      settings(parallel="fsdp"), A10GX8)


def test_a_distilled_matrix_trains_its_teachers_first_and_ends_ok(make_config, tmp_path: Path) -> None:
    path = make_config(MATRIX + "CONFIG_MAX_ITERS=8\nCONFIG_EVAL_INTERVAL=4\nCONFIG_MATRIX_JOBS=2\n")
    assert cli.main(["run", "--config", str(path), "--set", f"RESULTS_DIR={tmp_path / 'results'}"]) == 0
    runs = load_results(next((tmp_path / "results").iterdir())).runs
    assert sorted(r.status for r in runs) == ["ok"] * 4
    for run in runs:
        if "magnitude" in run.name:
            assert run.summary["distill"]["teacher"] == run.name.replace("magnitude_90", "none_0")
