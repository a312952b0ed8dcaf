"""Every Makefile target, driven for real through `make -C <root>` in a subprocess.

Each make call is pointed at temporary files (KCONFIG_CONFIG, RESULTS_DIR, DEFCONFIG_OUT),
so the developer's own .config, results/ and ./defconfig are never read or written.
Training runs are tiny (MAX_ITERS of a few steps on the mnist5k digits that ship with the venv):
nothing here uses the network or a GPU. The expensive setup (one quickstart matrix) is shared
through module-scoped fixtures.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import kconfiglib
import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_RUNS = 12  # defconfigs/lenet5-quick: sgd, adamw x (dense + magnitude x 3) + adamwprune x (dense + state x 3)
VENV = ROOT / ".venv"
PY = str(VENV / "bin" / "python")
STAMP = VENV / ".installed"
DEFCONFIGS = ROOT / "defconfigs"
QUICK = "lenet5-quick"
TIMEOUT = 120  # seconds for a make call that trains nothing
TRAIN_TIMEOUT = 300  # seconds for a make call that trains a matrix

# Variables a calling make (e.g. `make test MAX_ITERS=3`) or the user's shell could leak into ours.
LEAKY_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "KCONFIG_CONFIG", "KCONFIG_SEED", "MAX_ITERS",
             "EPOCHS", "SEEDS", "TIME", "RESULTS_DIR", "RESULTS", "YES", "VENV", "DEFCONFIG_OUT", "HARNESS_COMMAND",
             "MENUCONFIG_STYLE", "NAME", "AGAINST", "RUN", "ONLY", "CONFIG", "PYTHON", "WHEELS", "PARTS", "DRY")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env.update(extra)
    return env


def make(tmp: Path, *args: str, timeout: float = TIMEOUT, env: dict[str, str] | None = None,
         **variables: str) -> subprocess.CompletedProcess:
    """`make -C ROOT args...` with the config, results and defconfig paths inside ``tmp``.

    ``variables`` are passed as VAR=value on the command line and override the tmp defaults.
    """
    values = {"KCONFIG_CONFIG": str(tmp / ".config"), "RESULTS_DIR": str(tmp / "results"),
              "DEFCONFIG_OUT": str(tmp / "defconfig"), **variables}
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), *args, *(f"{k}={v}" for k, v in values.items())]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            env=env or base_env())
    assert "Setting up" not in result.stdout, f"make tried to reinstall the venv:\n{result.stdout}"
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def output(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failing command's single `error: ...` line (make's own `make: ***` line is set aside)."""
    assert result.returncode != 0, output(result)
    assert "Traceback" not in result.stderr, output(result)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("make: ")]
    assert len(lines) == 1, output(result)
    assert lines[0].startswith("error: "), output(result)
    return lines[0]


def config_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("CONFIG_")]


def defconfig_lines(name: str) -> list[str]:
    return [line for line in (DEFCONFIGS / name).read_text().splitlines() if line.startswith("CONFIG_")]


def kconfig_symbol(name: str) -> kconfiglib.Symbol:
    """A symbol of the Kconfig tree with no .config loaded (its value is its default)."""
    os.environ["srctree"] = str(ROOT)
    kconf = kconfiglib.Kconfig(str(ROOT / "Kconfig"), warn_to_stderr=False)
    return kconf.syms[name]


def developer_state() -> dict[str, object]:
    """What of the developer's own files a test must leave alone (existence and mtime)."""
    state = {}
    for name in (".config", ".config.old", "results", "defconfig", ".venv", ".venv/.installed"):
        path = ROOT / name
        state[name] = path.stat().st_mtime_ns if path.exists() else None
    return state


def venv_pycache() -> Path | None:
    """One existing __pycache__ inside the real .venv, to check `clean` leaves the venv alone."""
    for candidate in sorted((VENV / "lib").glob("python3*/site-packages/__pycache__")):
        return candidate
    return None


def matrix_rows(stdout: str) -> list[list[str]]:
    """The numbered rows of the dry-run table, split into cells."""
    return [line.split() for line in stdout.splitlines() if re.match(r"^\d+\s+\S+\s+\S+\s+\S+\s+\d+%\s", line)]


@pytest.fixture(scope="module", autouse=True)
def venv_is_current():
    """The tests must never make the Makefile reinstall the venv (that needs the network)."""
    if not STAMP.exists():
        pytest.skip(f"{STAMP} is missing: run `make venv` first (these tests never install anything)")
    stale = subprocess.run(["make", "-q", "-C", str(ROOT), ".venv/.installed"], env=base_env(),
                           capture_output=True, text=True, timeout=30)
    if stale.returncode != 0:
        pytest.fail(f"{STAMP} is older than requirements*.txt: any make target would reinstall the venv; "
                    f"run `make venv` first")
    before = developer_state()
    yield
    after = developer_state()
    changed = sorted(name for name in before if before[name] != after[name])
    assert not changed, f"the developer's {changed} changed during these tests (a make call, or another process?)"


@pytest.fixture(scope="module")
def quick_config(tmp_path_factory) -> Path:
    """A .config written by `make defconfig-lenet5-quick` (read-only for tests: copy it to change it)."""
    tmp = tmp_path_factory.mktemp("quick")
    result = make(tmp, f"defconfig-{QUICK}")
    assert result.returncode == 0, output(result)
    return tmp / ".config"


@pytest.fixture
def quick_copy(quick_config: Path, tmp_path: Path) -> Path:
    shutil.copy(quick_config, tmp_path / ".config")
    return tmp_path / ".config"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`make defconfig-lenet5-quick` then plain `make MAX_ITERS=6`: (tmp, make result, results folder)."""
    tmp = tmp_path_factory.mktemp("e2e")
    written = make(tmp, f"defconfig-{QUICK}")
    assert written.returncode == 0, output(written)
    result = make(tmp, MAX_ITERS="6", timeout=TRAIN_TIMEOUT)
    folders = sorted(p for p in (tmp / "results").iterdir()) if (tmp / "results").is_dir() else []
    return tmp, result, folders


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- help, listing and config-writing targets ---------------------------------------------------------------


def phony_targets() -> list[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    assert match, "the Makefile has no .PHONY line"
    return match.group(1).split()


def test_help_lists_every_phony_target_and_defconfig_pattern(tmp_path):
    result = make(tmp_path, "help")
    assert result.returncode == 0, output(result)
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.strip()}
    targets = phony_targets()
    assert len(targets) >= 20
    missing = [t for t in [*targets, "defconfig-%"] if t not in listed]
    assert not missing, f"`make help` does not list {missing}:\n{result.stdout}"
    assert "KCONFIG_CONFIG" in result.stdout and "MAX_ITERS" in result.stdout


def test_list_defconfigs_lists_every_file(tmp_path):
    result = make(tmp_path, "list-defconfigs")
    assert result.returncode == 0, output(result)
    expected = sorted(p.name for p in DEFCONFIGS.iterdir() if p.is_file())
    assert expected and QUICK in expected
    assert result.stdout.split() == expected


def test_defconfig_writes_the_config(tmp_path):
    result = make(tmp_path, f"defconfig-{QUICK}")
    assert result.returncode == 0, output(result)
    written = tmp_path / ".config"
    assert written.is_file()
    lines = config_lines(written)
    for line in defconfig_lines(QUICK):
        assert line in lines, f"{line} from defconfigs/{QUICK} is not in the written .config"
    assert 'CONFIG_RESULTS_NAME="lenet5-quick"' in lines
    assert "CONFIG_MATRIX_JOBS=2" in lines
    assert "CONFIG_DEVICE_CPU=y" in lines
    assert len(lines) > 3 * len(defconfig_lines(QUICK))  # resolved: every visible symbol, defaults included
    assert str(written) in result.stdout and "wrote" in result.stdout


def test_defconfig_typo_names_the_closest_and_writes_nothing(tmp_path):
    target = tmp_path / ".config"
    result = make(tmp_path, "defconfig-lenet5-quik")
    line = one_error_line(result)
    assert "lenet5-quick" in line and "lenet5-quik" in line
    assert not target.exists()
    target.write_text("# the user's config\nCONFIG_EPOCHS=3\n")
    before = target.read_bytes()
    result = make(tmp_path, "defconfig-lenet5-quik")
    assert "lenet5-quick" in one_error_line(result)
    assert target.read_bytes() == before


def test_olddefconfig_restores_a_deleted_line_at_its_default(quick_copy, tmp_path):
    default = kconfig_symbol("EPOCHS").str_value
    lines = quick_copy.read_text().splitlines(keepends=True)
    assert "CONFIG_EPOCHS=15\n" in lines and default != "15"
    quick_copy.write_text("".join(line for line in lines if not line.startswith("CONFIG_EPOCHS=")))
    result = make(tmp_path, "olddefconfig")
    assert result.returncode == 0, output(result)
    after = config_lines(quick_copy)
    assert f"CONFIG_EPOCHS={default}" in after
    assert "CONFIG_MATRIX_JOBS=2" in after and 'CONFIG_RESULTS_NAME="lenet5-quick"' in after  # the rest is kept


def test_savedefconfig_writes_the_minimal_config(quick_copy, tmp_path):
    result = make(tmp_path, "savedefconfig")
    assert result.returncode == 0, output(result)
    out = tmp_path / "defconfig"
    assert out.is_file()
    assert str(out) in result.stdout
    minimal = config_lines(out)
    assert set(defconfig_lines(QUICK)) <= set(minimal)
    assert len(minimal) * 3 < len(config_lines(quick_copy))


def test_listnewconfig_lists_a_missing_symbol(quick_copy, tmp_path):
    result = make(tmp_path, "listnewconfig")
    assert result.returncode == 0, output(result)
    assert "CONFIG_" not in result.stdout, "a complete .config has no new symbols"
    quick_copy.write_text("".join(line for line in quick_copy.read_text().splitlines(keepends=True)
                                  if not line.startswith("CONFIG_MAX_ITERS=")))
    result = make(tmp_path, "listnewconfig")
    assert result.returncode == 0, output(result)
    listed = re.findall(r"^(CONFIG_\w+)", result.stdout, re.MULTILINE)
    assert listed == ["CONFIG_MAX_ITERS"], output(result)


@pytest.mark.parametrize("target,multiple", [("allyesconfig", "CONFIG_OPTIMIZER_MULTIPLE=y"),
                                             ("allnoconfig", "# CONFIG_OPTIMIZER_MULTIPLE is not set")])
def test_all_yes_no_config_is_valid(tmp_path, target, multiple):
    result = make(tmp_path, target)
    assert result.returncode == 0, output(result)
    written = tmp_path / ".config"
    assert multiple in written.read_text().splitlines()
    check = subprocess.run([PY, "-m", "lib.cli", "--config", str(written), "check"], cwd=ROOT, env=base_env(),
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0 and "ok" in check.stdout, output(check)


def test_randconfig_seed_repeats_the_same_file(tmp_path):
    files = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        result = make(tmp_path, "randconfig", KCONFIG_CONFIG=str(tmp_path / name), KCONFIG_SEED=seed)
        assert result.returncode == 0, output(result)  # the Kconfig dependencies keep it valid
        assert f"KCONFIG_SEED={seed}" in result.stdout and "it is valid" in result.stdout, output(result)
        files[name] = (tmp_path / name).read_bytes()
    assert files["a"] == files["b"]
    assert files["a"] != files["c"]


# --- menuconfig in a pseudo-terminal ---------------------------------------------------------------------------

ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")


class Terminal:
    """A process on a 40x120 pseudo-terminal, read until some text shows (every wait is bounded)."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def _pump(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side closed
            return False
        self.seen += chunk
        return bool(chunk)

    def text(self) -> str:
        return ANSI.sub(b"", self.seen).decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or not self._pump(0.2):
                raise AssertionError(f"{needle!r} never showed; screen so far:\n{self.text()[-3000:]}")

    def send(self, keys: bytes) -> None:
        self.seen = b""
        os.write(self.master, keys)

    def finish(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._pump(0.2) and self.proc.poll() is None:
            pass
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        os.close(self.master)


def test_menuconfig_saves_and_quits(tmp_path):
    target = tmp_path / ".config"
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "menuconfig", f"KCONFIG_CONFIG={target}"]
    term = Terminal(cmd, base_env(TERM="xterm-256color"))
    try:
        term.wait_for("Pruning experiment harness")
        term.wait_for("Model")
        term.send(b"S")  # save dialog, prefilled with $KCONFIG_CONFIG
        term.wait_for("Filename to save")
        term.send(b"\r")
        term.wait_for("Configuration saved to")
        term.send(b"\r")  # dismiss the "Success" message
        time.sleep(0.3)
        term.send(b"Q")  # nothing changed since the save: quits without asking
        status = term.finish()
    finally:
        term.close()
    assert status == 0, term.text()[-3000:]
    assert "Traceback" not in term.text()
    assert target.is_file()
    lines = config_lines(target)
    assert "CONFIG_MODEL_LENET5=y" in lines and any(line.startswith("CONFIG_EPOCHS=") for line in lines)


# --- dry-run and overrides -------------------------------------------------------------------------------------


def test_dry_run_prints_the_matrix_and_trains_nothing(quick_config):
    tmp = quick_config.parent
    result = make(tmp, "dry-run")
    assert result.returncode == 0, output(result)
    rows = matrix_rows(result.stdout)
    assert len(rows) == QUICK_RUNS, result.stdout
    assert [r[0] for r in rows] == [str(i) for i in range(1, QUICK_RUNS + 1)]
    assert all(r[1].startswith("lenet5_") for r in rows)
    assert re.search(r"^plan for lenet5: ", result.stdout, re.MULTILINE), result.stdout
    assert f"{QUICK_RUNS} run(s); nothing trained" in result.stdout
    assert not (tmp / "results").exists()


def test_dry_run_without_config_says_make_defconfig(tmp_path):
    result = make(tmp_path, "dry-run")
    assert "make defconfig-<name>" in one_error_line(result)
    assert not (tmp_path / ".config").exists()


def test_dry_run_seeds_override(quick_config):
    result = make(quick_config.parent, "dry-run", SEEDS="2")
    assert result.returncode == 0, output(result)
    names = [r[1] for r in matrix_rows(result.stdout)]
    assert len(names) == 2 * QUICK_RUNS, result.stdout
    assert sum(n.endswith("_s1") for n in names) == QUICK_RUNS and sum(n.endswith("_s2") for n in names) == QUICK_RUNS
    assert "CONFIG_SEEDS=1" in config_lines(quick_config)  # an override is never written to .config


def test_dry_run_seeds_out_of_range(quick_config):
    low, high = (v.str_value for v in kconfig_symbol("SEEDS").ranges[0][:2])
    line = one_error_line(make(quick_config.parent, "dry-run", SEEDS="0"))
    assert "CONFIG_SEEDS" in line and low in line and high in line


def test_dry_run_bad_time_budget(quick_config):
    line = one_error_line(make(quick_config.parent, "dry-run", TIME="soon"))
    assert "CONFIG_TIME_BUDGET" in line and "soon" in line
    line = one_error_line(make(quick_config.parent, "dry-run", TIME="5"))
    assert "CONFIG_TIME_BUDGET='5' has no unit: write 5s, 5m or 5h" in line


def test_compound_time_survives_the_shell(quick_config):
    result = make(quick_config.parent, "dry-run", TIME="1h 30m")  # one --set argument, not two
    assert result.returncode == 0 and "nothing trained" in result.stdout, output(result)


@pytest.mark.parametrize("where,goal", [("proc", []), ("under-a-file", ["run"])])
def test_unwritable_results_dir_is_one_line(quick_copy, tmp_path, where, goal):
    if where == "proc":
        results = Path("/proc/forbidden_harness_results")
    else:
        (tmp_path / "a_file").write_text("not a folder\n")
        results = tmp_path / "a_file" / "results"
    result = make(tmp_path, *goal, MAX_ITERS="2", RESULTS_DIR=str(results))
    line = one_error_line(result)
    assert "CONFIG_RESULTS_DIR" in line and str(results) in line
    assert not results.exists()


def test_prepare_data_needs_nothing_for_mnist5k(quick_config):
    if "CONFIG_LENET5_DATASET_MNIST5K=y" not in config_lines(quick_config):
        pytest.skip(f"defconfigs/{QUICK} no longer uses mnist5k: prepare-data would need the network")
    result = make(quick_config.parent, "prepare-data")
    assert result.returncode == 0, output(result)
    assert "mnist5k" in result.stdout and "nothing to download" in result.stdout


# --- a real matrix through make: run, continue, report, quickstart -----------------------------------------------


def test_make_trains_the_quick_matrix(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0, output(result)
    assert len(folders) == 1, folders
    folder = folders[0]
    assert folder.name.startswith("lenet5-quick_")
    assert f"results: {folder}" in result.stdout
    for name in ("config.txt", "matrix.json", "summary.json", "report.md"):
        assert (folder / name).is_file(), name
    runs = read_json(folder / "matrix.json")["runs"]
    assert len(runs) == QUICK_RUNS
    assert "MAX_ITERS=6" in read_json(folder / "matrix.json")["command"]
    summary = read_json(folder / "summary.json")["runs"]
    assert [s["name"] for s in summary] == runs
    assert all(s["status"] == "ok" for s in summary), [(s["name"], s["status"], s.get("error")) for s in summary]
    report = (folder / "report.md").read_text()
    for name in runs:
        assert name in report


def test_make_records_the_override(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    assert "# override: MAX_ITERS=6" in (folder / "config.txt").read_text().splitlines()
    assert "CONFIG_MAX_ITERS=0" in config_lines(tmp / ".config")  # the .config itself is unchanged
    for name in read_json(folder / "matrix.json")["runs"]:
        assert read_json(folder / name / "spec.json")["train"]["max_iters"] == 6, name
        assert read_json(folder / name / "summary.json")["steps"]["done"] == 6, name


def test_continue_reruns_only_unfinished_runs(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    runs = read_json(folder / "matrix.json")["runs"]
    redo = [runs[0], runs[-1]]
    for name in redo:
        (folder / name / "summary.json").unlink()
    kept = {name: ((folder / name / "summary.json").stat().st_mtime_ns, (folder / name / "summary.json").read_bytes())
            for name in runs if name not in redo}

    result = make(tmp, "continue", timeout=TRAIN_TIMEOUT)
    assert result.returncode == 0, output(result)
    assert f"2 of {QUICK_RUNS} run(s) to do" in result.stdout
    for name in redo:
        assert read_json(folder / name / "summary.json")["status"] == "ok", name
    for name, (mtime, content) in kept.items():
        path = folder / name / "summary.json"
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, f"{name} was rerun"
    summary = read_json(folder / "summary.json")["runs"]
    assert len(summary) == QUICK_RUNS and all(s["status"] == "ok" for s in summary)
    assert sorted((tmp / "results").iterdir()) == [folder], "continue must not create a new results folder"

    again = make(tmp, "continue")
    assert "no unfinished results folder" in one_error_line(again)


def test_report_rewrites_report_md(e2e):
    tmp, result, folders = e2e
    assert result.returncode == 0 and len(folders) == 1, output(result)
    folder = folders[0]
    (folder / "report.md").unlink()
    result = make(tmp, "report", RESULTS=str(folder))
    assert result.returncode == 0, output(result)
    assert str(folder / "report.md") in result.stdout
    report = (folder / "report.md").read_text()
    for name in read_json(folder / "matrix.json")["runs"]:
        assert name in report


# --- venv, lint, test, clean, mrproper ---------------------------------------------------------------------------


def test_venv_is_up_to_date_and_not_reinstalled(tmp_path):
    before = STAMP.stat().st_mtime_ns
    result = make(tmp_path, "venv")
    assert result.returncode == 0, output(result)
    assert "pip" not in result.stdout + result.stderr
    assert STAMP.stat().st_mtime_ns == before


def test_lint_runs_ruff(tmp_path):
    result = make(tmp_path, "lint")
    text = result.stdout + result.stderr
    if result.returncode == 0:
        assert "All checks passed" in text, output(result)
    else:  # the tree may be mid-edit; the target still ran ruff and reported its findings
        assert result.returncode == 2 and re.search(r"Found \d+ error", text), output(result)


def test_test_target_runs_pytest(tmp_path):
    result = make(tmp_path, "-n", "test")  # running it here would recurse into this very suite
    assert result.returncode == 0, output(result)
    assert re.search(r"python\S* -m pytest\b.* tests\b", result.stdout), output(result)


@pytest.fixture
def clean_probe():
    probe = ROOT / "tests" / "_tmp_clean_probe"
    (probe / "__pycache__").mkdir(parents=True, exist_ok=True)
    (probe / "__pycache__" / "x.pyc").write_bytes(b"")
    try:
        yield probe
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def test_clean_removes_caches_only(tmp_path, clean_probe):
    sentinel = venv_pycache()
    result = make(tmp_path, "clean")
    assert result.returncode == 0, output(result)
    assert "removed caches" in result.stdout
    assert clean_probe.is_dir() and not (clean_probe / "__pycache__").exists()
    assert sentinel is None or sentinel.is_dir(), "clean removed __pycache__ inside .venv"


def mrproper_victims(tmp: Path) -> dict[str, Path]:
    victims = {"config": tmp / ".config", "config_old": tmp / ".config.old", "results": tmp / "results",
               "venv": tmp / "fakevenv", "keep": tmp / "keep.txt"}
    victims["config"].write_text("CONFIG_EPOCHS=1\n")
    victims["config_old"].write_text("CONFIG_EPOCHS=2\n")
    (victims["results"] / "run_1").mkdir(parents=True)
    (victims["results"] / "run_1" / "summary.json").write_text("{}")
    (victims["venv"] / "bin").mkdir(parents=True)
    (victims["venv"] / "bin" / "python").write_text("#!/bin/false\n")
    victims["keep"].write_text("not mrproper's\n")
    return victims


def test_mrproper_refuses_without_yes_and_deletes_nothing_of_its_own(tmp_path):
    victims = mrproper_victims(tmp_path)
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]))  # stdin is /dev/null: not a terminal
    assert result.returncode != 0, output(result)
    assert "YES=1" in one_error_line(result)
    for name, path in victims.items():
        assert path.exists(), f"mrproper without YES=1 deleted {name}"


def test_mrproper_refused_deletes_no_caches(tmp_path, clean_probe):
    victims = mrproper_victims(tmp_path)
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]))
    assert result.returncode != 0, output(result)
    assert (clean_probe / "__pycache__" / "x.pyc").exists()


def test_mrproper_yes_deletes_exactly_its_files(tmp_path):
    victims = mrproper_victims(tmp_path)
    sentinel = venv_pycache()
    result = make(tmp_path, "mrproper", VENV=str(victims["venv"]), YES="1")
    assert result.returncode == 0, output(result)
    assert "removed" in result.stdout
    for name in ("config", "config_old", "results", "venv"):
        assert not victims[name].exists(), f"mrproper YES=1 left {name}"
    assert victims["keep"].read_text() == "not mrproper's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert STAMP.exists() and (ROOT / "Kconfig").exists() and (ROOT / "Makefile").exists()
    assert sentinel is None or sentinel.is_dir(), "mrproper VENV=elsewhere removed __pycache__ inside .venv"


# --- a killed matrix resumes (issue 11) ------------------------------------------------------------------------

KILLABLE = """CONFIG_OPTIMIZER_MULTIPLE=y
CONFIG_OPTIMIZER_ENABLE_SGD=y
CONFIG_OPTIMIZER_ENABLE_ADAMW=y
CONFIG_PRUNING_MULTIPLE=y
CONFIG_PRUNING_ENABLE_MAGNITUDE=y
CONFIG_SPARSITY_MULTIPLE=y
CONFIG_SPARSITY_ENABLE_70=n
CONFIG_MATRIX_JOBS=2
CONFIG_MAX_ITERS=60
CONFIG_CKPT_INTERVAL=8
CONFIG_LOG_INTERVAL=1
"""


def _results(folder: Path) -> dict[str, dict]:
    runs = json.loads((folder / "summary.json").read_text())["runs"]
    keys = ("status", "best", "test_at_best", "sparsity", "steps", "flags")
    return {r["name"]: {k: r.get(k) for k in keys} for r in runs}


def test_sigterm_to_makes_process_group_stops_cleanly_and_records_the_stopped_runs(tmp_path):
    """What `timeout` and schedulers send: every process of the group gets SIGTERM (make forwards a second to
    the driver). Each running run checkpoints, the folder's summary names them stopped, one error line."""
    from tests.conftest import resolve_defconfig

    resolve_defconfig(KILLABLE.replace("CONFIG_MAX_ITERS=60", "CONFIG_MAX_ITERS=100000"), tmp_path / ".config")
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), f"KCONFIG_CONFIG={tmp_path / '.config'}",
           f"RESULTS_DIR={tmp_path / 'results'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env(),
                            start_new_session=True)
    deadline = time.time() + TRAIN_TIMEOUT
    while len(list(tmp_path.glob("results/*/*/checkpoints/step_*"))) < 2:  # both runs are training
        assert proc.poll() is None and time.time() < deadline, "the matrix ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=TRAIN_TIMEOUT)
    assert proc.returncode != 0 and "Traceback" not in out + err, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: SIGTERM: 2 run(s) stopped after a checkpoint, 4 not "
                                                     "started;"), err
    (folder,) = tmp_path.glob("results/*")
    states = sorted(r["status"] for r in json.loads((folder / "summary.json").read_text())["runs"])
    assert states == ["queued"] * 4 + ["stopped"] * 2
    assert "6 run(s): 4 queued, 2 stopped." in (folder / "report.md").read_text()
    for run_dir in folder.iterdir():  # no trainer is left holding a run, and the stopped ones can resume
        if run_dir.is_dir() and (run_dir / "spec.json").exists():
            from lib.core import runlock

            runlock.check_free(run_dir, grace_s=0)
    assert len(list(folder.glob("*/checkpoints/latest"))) == 2


def test_a_matrix_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
    from tests.conftest import resolve_defconfig

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for tmp in (whole, killed):
        tmp.mkdir()
        resolve_defconfig(KILLABLE, tmp / ".config")
    done = make(whole, timeout=TRAIN_TIMEOUT)
    assert done.returncode == 0, output(done)
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), f"KCONFIG_CONFIG={killed / '.config'}",
           f"RESULTS_DIR={killed / 'results'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=base_env(),
                            start_new_session=True)
    deadline = time.time() + TRAIN_TIMEOUT
    while not (list(killed.glob("results/*/*/summary.json")) and list(killed.glob("results/*/*/checkpoints/step_*"))):
        assert proc.poll() is None and time.time() < deadline, "the matrix ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # make, the driver and every trainer at once: nothing can save its work
    proc.wait()
    resumed = make(killed, "continue", timeout=TRAIN_TIMEOUT)
    assert resumed.returncode == 0, output(resumed)
    (a,), (b,) = whole.glob("results/*"), killed.glob("results/*")
    assert _results(a) == _results(b)
    records = json.loads((b / "summary.json").read_text())["runs"]
    assert any(r.get("resumed") for r in records), "no run was resumed from a checkpoint"
