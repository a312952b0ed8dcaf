"""RunSpec: everything one training run needs, and nothing it must look up elsewhere.

A RunSpec is written as ``spec.json`` in its run folder; ``python -m lib.train.run
<run_dir>`` re-runs it from that file alone. The trainer never reads .config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.core.errors import HarnessError
from lib.core.files import write_json_atomic


@dataclass(frozen=True)
class OptimSettings:
    """Hyperparameters of the optimizer this run uses (lr is the peak learning rate)."""

    name: str
    lr: float
    weight_decay: float
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    base: str = ""  # adamwprune: the update rule it applies ("adamw" or "adamwspam")
    spam_form: str = "released"  # the authors' released optimizer, or "knlp" (the public AdamWPrune code)
    spam_theta: float = 5000.0
    spam_interval: int = 500
    spam_warmup: int = 150
    spam_clip: bool = True
    spam_accu: int = 20  # released form: no clipping in the first accu steps after a reset (and of training)
    compact_state: bool = False  # moments for the kept weights only once the masks settle (lib/optim/compact.py)


@dataclass(frozen=True)
class PruneSettings:
    """How and when to prune. ``start``/``end`` are steps (int) or fractions of the run (float)."""

    method: str = "none"
    target: float = 0.0
    schedule: str = "cubic"
    start: int | float = 0.1
    end: int | float = 0.7
    frequency: int = 10
    threshold: str = "exact"  # "exact", "sampled" or "per-layer"
    distribution: str = "global"  # per-layer targets: global (none), uniform, erk, sweep (lib/pruning/distribution.py)
    layer_curves: tuple = ()  # "sweep": ((layer, shape, ((sparsity, drop), ...)), ...) (lib/pruning/sensitivity.py)
    layer_source: str = ""  # "sweep": the sensitivity file the curves were read from, and its digest
    owl_m: float = 5.0  # "owl": a score is an outlier above M x the mean of its block's (lib/pruning/owl.py)
    owl_lambda: float = 0.08  # "owl": layer sparsities within target +- lambda
    owl_batches: int = 8  # "owl": training micro-batches of calibration text
    sample_tolerance: float = 0.1  # sampled threshold: worst sparsity error aimed at, in points (3.22 sigma)
    importance: str = "magnitude"  # magnitude pruning: "magnitude", "gradient-sensitivity", "activation"
    movement_form: str = "sanh"  # "sanh" (paper) or "knlp"
    variant: str = ""  # state pruning: "bitter0" .. "bitter9"
    bitter8_form: str = "paper"  # "paper" or "knlp"
    nm_n: int = 2  # N:M pruning: keep N of every M consecutive weights along the input dimension
    nm_m: int = 4

    def __post_init__(self) -> None:  # spec.json gives lists back: keep specs read and planned equal
        curves = tuple((name, tuple(shape), tuple(tuple(point) for point in curve))
                       for name, shape, curve in self.layer_curves)
        object.__setattr__(self, "layer_curves", curves)


@dataclass(frozen=True)
class TrainSettings:
    """The training budget and loop settings shared by every model."""

    batch_size: int
    epochs: int = 0
    max_iters: int = 0
    time_budget_s: float = 0.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 0.0
    eval_interval: int = 0
    eval_batches: int = 0
    log_interval: int = 10
    deterministic: bool = True
    keep_checkpoints: bool = True
    ckpt_interval: int = 0  # training checkpoint every N steps (0 = not by steps)
    ckpt_time_s: float = 0.0  # ... and/or every T seconds (0 = not by time)
    ckpt_keep_last: int = 3
    ckpt_milestone: int = 0  # keep a copy every M steps for good (0 = none)
    structure_stats_every: int = 0  # structure statistics for surgery every N steps (0 = none)
    surgery_every: int = 0  # cut the run's checkpoint every N steps and train on (0 = never)
    quant_aware: bool = False  # Linear weights fake-quantized to int8 in the forward (lib/quant)
    distill_weight: float = 0.0  # CONFIG_DISTILL: share of the KL term to a dense teacher (0: off; lib/train/distill)
    distill_temperature: float = 2.0
    distill_teacher: str = ""  # a run of the same results folder (its name) or a run folder (its absolute path)


@dataclass(frozen=True)
class SurgerySettings:
    """What `make surgery` does to a run's checkpoint (lib/surgery/command.py); training ignores them."""

    fraction: float = 0.3  # share of each layer's structures removed
    structure: str = "all"  # of which kind: "all", "heads", "neurons", "channels", "units", "blocks"
    max_loss_increase: float = 0.5  # accepted only if the validation loss rises by at most this


@dataclass(frozen=True)
class SweepSettings:
    """What `make sweep` tries on a run's best checkpoint (lib/sweep/oneshot.py); training ignores them."""

    sparsities: tuple = (0.3, 0.5, 0.7, 0.9)
    metrics: tuple = ("magnitude", "gradient-sensitivity", "activation")
    patterns: tuple = ("unstructured", "2:4", "structured")
    calibration_batches: int = 8  # training micro-batches the gradient and activation metrics see
    tolerance_accuracy: float = 1.0  # points below dense still recommended
    tolerance_perplexity: float = 5.0  # percent above dense still recommended
    int8: bool = False  # each row also after torchao int8 (lib/quant): metric, size as stored, CPU latency
    layers: bool = False  # also each layer pruned alone: per-layer sensitivity, the sweep distribution's file

    def __post_init__(self) -> None:  # spec.json gives lists back
        for name in ("sparsities", "metrics", "patterns"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class HardwarePlan:
    """Where and how the run executes; decided by lib.hardware.plan()."""

    device: str
    micro_batch: int
    grad_accum: int
    world_size: int = 1
    compile: bool = False
    fused_step: bool = False  # AdamWPrune applies its masks inside the update (lib/optim/masked_step.py)
    act_ckpt: str = "none"  # activation checkpointing policy (lib/hardware/actckpt.py)
    act_ckpt_every: int = 2  # the uniform policy's N
    act_ckpt_segments: tuple = ()  # (first block, last block, selective) of each checkpointed segment
    dtype: str = "float32"
    threads: int = 0  # torch CPU threads per process (0 = torch's default)
    rationale: str = ""
    tf32: bool = False  # TF32 matmuls (NVIDIA Ampere and newer)
    probe: bool = False  # try the micro-batch before training and halve it on out-of-memory
    backend: str = ""  # torch.distributed backend when world_size > 1: "nccl" or "gloo"
    nnodes: int = 1  # machines taking part; world_size = nnodes x processes per node
    node_rank: int = 0
    rdzv_endpoint: str = ""  # host:port of the torchrun rendezvous (multi-node only)
    rdzv_id: str = ""
    parallel: str = "ddp"  # how several ranks share the model: "ddp" (replicated) or "fsdp" (FSDP2, sharded)

    def __post_init__(self) -> None:  # spec.json gives lists back: keep plans read and planned equal
        object.__setattr__(self, "act_ckpt_segments", tuple(tuple(s) for s in self.act_ckpt_segments))

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over every micro-batch and rank."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes


@dataclass(frozen=True)
class RunSpec:
    """One run of the matrix: model x optimizer x pruning x sparsity x seed."""

    name: str
    model: str
    seed: int
    optim: OptimSettings
    prune: PruneSettings
    train: TrainSettings
    hardware: HardwarePlan
    model_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str = "data"
    tracker: str = "none"  # "none", "wandb" or "trackio"
    tracker_project: str = ""
    wandb_mode: str = ""  # "online", "offline" or "disabled"
    surgery: SurgerySettings = field(default_factory=SurgerySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)

    @property
    def optimizer(self) -> str:
        return self.optim.name

    @property
    def pruning(self) -> str:
        return self.prune.method

    @property
    def sparsity(self) -> float:
        return self.prune.target

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """The RunSpec of a spec.json of any schema version (older ones migrated, see ``migrate``)."""
        data, _ = migrate(data)
        parts = {
            "optim": OptimSettings,
            "prune": PruneSettings,
            "train": TrainSettings,
            "hardware": HardwarePlan,
            "surgery": SurgerySettings,
            "sweep": SweepSettings,
        }
        kwargs = dict(data)
        for key, kind in parts.items():
            if key in data:  # specs written before a part existed take its defaults
                kwargs[key] = kind(**data[key])
        return cls(**kwargs)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> RunSpec:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise HarnessError(f"{path}: no such spec.json; give a run folder made by `make`") from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise HarnessError(f"{path}: not a valid spec.json ({exc}); re-create the run with `make`") from None


# Every change to the RunSpec's fields bumps SCHEMA_VERSION and adds a migration from the version before, so
# that every spec.json ever published loads (tests/core/test_spec_versions.py guards the field list).
SCHEMA_VERSION = 8


def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` of any schema version brought to today's, and one line per removed behaviour it asked for: what
    a rerun runs instead and why it cannot match. Settings added since take their defaults."""
    data = dict(data)
    version = data.pop("schema", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise HarnessError(f"spec.json schema {version!r} is newer than this harness's {SCHEMA_VERSION}; update the "
                           f"harness (git pull) to read it")
    notes: list[str] = []
    for step in _MIGRATIONS[version:]:
        data = step(data, notes)
    return data, notes


def _from_unversioned(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 0 -> 1 (issue 12, 2026-12-02): the sampled threshold's fraction became a tolerance, and AdamWSPAM's
    'paper' form was removed."""
    prune, optim = dict(data.get("prune", {})), dict(data.get("optim", {}))
    fraction = prune.pop("sample_fraction", None)
    if fraction is not None and prune.get("threshold") == "sampled" and prune.get("method", "none") != "none":
        notes.append(f"its sampled threshold drew {fraction:g} of the scores, a rule since replaced by a fixed-size "
                     f"block sample at PRUNING_SAMPLE_TOLERANCE {PruneSettings.sample_tolerance:g} points; the rerun "
                     f"uses that, so its masks cannot match")
    if optim.get("spam_form") == "paper":
        optim["spam_form"] = "released"
        if optim.get("name") == "adamwspam" or optim.get("base") == "adamwspam":
            notes.append("AdamWSPAM's 'paper' form was removed (no rule of it could be shown to differ from the "
                         "authors' released code); the rerun uses the released form and may not match")
    return {**data, "prune": prune, "optim": optim}


def _from_1(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 1 -> 2 (issue 28, 2026-12-06): TrainSettings.quant_aware and SweepSettings.int8 were added; both
    default to off, which is what every earlier run did, so nothing changes and nothing is noted."""
    return data


def _from_2(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 2 -> 3 (issue 29, 2026-12-06): OptimSettings.compact_state was added; off, as every earlier run was,
    and a compact run is bit-identical to a dense one anyway."""
    return data


def _from_3(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 3 -> 4 (issue 30, 2026-12-06): HardwarePlan.parallel was added; "ddp", how every earlier run with
    several ranks trained (one rank needs neither), so nothing changes."""
    return data


def _from_4(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 4 -> 5 (issue 32, 2026-12-06): PruneSettings.distribution was added; "global", the single threshold
    every earlier run used, so nothing changes."""
    return data


def _from_5(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 5 -> 6 (issue 32, 2026-12-07): PruneSettings.layer_curves and layer_source (the sweep distribution)
    and SweepSettings.layers were added; empty and off, as every earlier run was, so nothing changes."""
    return data


def _from_6(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 6 -> 7 (issue 32, 2026-12-07): PruneSettings.owl_m, owl_lambda and owl_batches (the owl
    distribution) were added; read only by it, which no earlier run used, so nothing changes."""
    return data


def _from_7(data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Schema 7 -> 8 (issue 32, 2026-12-07): TrainSettings.distill_weight, distill_temperature and distill_teacher
    (CONFIG_DISTILL) were added; weight 0 is off, as every earlier run was, so nothing changes."""
    return data


# _MIGRATIONS[v] takes schema v to v + 1
_MIGRATIONS = [_from_unversioned, _from_1, _from_2, _from_3, _from_4, _from_5, _from_6, _from_7]


# A method's identity: every setting that changes what training does. Two runs are the same method (and may be
# paired, seed by seed) only when these agree; the seed, the target sparsity (the other axis), where and how it
# ran (hardware plan, data_dir, tracker) and what only bookkeeps (logging, checkpoint cadence) are left out.
NOT_METHOD = {"prune.target", "optim.compact_state", "train.log_interval", "train.deterministic",
              "train.keep_checkpoints", "train.ckpt_interval", "train.ckpt_time_s", "train.ckpt_keep_last",
              "train.ckpt_milestone", "model_options.text_dir", "train.distill_teacher"}


def method_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The flat identity of ``spec`` (a spec.json of any schema): "part.field" -> value, defaults filled in."""
    data, _ = migrate(spec)
    found: dict[str, Any] = {"model": data.get("model")}
    found.update({f"model_options.{k}": v for k, v in sorted((data.get("model_options") or {}).items())})
    parts = {"optim": OptimSettings, "prune": PruneSettings, "train": TrainSettings}
    if (data.get("train") or {}).get("surgery_every"):  # cuts during training change what is trained
        parts["surgery"] = SurgerySettings
    for part, kind in parts.items():
        given = data.get(part) or {}
        for f in dataclasses.fields(kind):
            default = f.default if f.default is not dataclasses.MISSING else None
            found[f"{part}.{f.name}"] = given.get(f.name, default)
    return {k: v for k, v in found.items() if k not in NOT_METHOD}


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """'setting A-value vs B-value' for each setting where two identities differ."""
    return [f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def run_spec(run_dir: Path) -> RunSpec:
    """The RunSpec of the run folder ``run_dir``; one line when it is not a run folder."""
    if not (Path(run_dir) / "spec.json").is_file():
        raise HarnessError(f"{run_dir}: not a run folder (no spec.json); give RUN=results/<folder>/<run>")
    return RunSpec.read(Path(run_dir) / "spec.json")
