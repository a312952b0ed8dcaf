"""The Makefile's help, listing, config-writing, menuconfig and dry-run targets, driven for real through
`make -C <root>` (tests/make_driver.py) with nothing trained."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from tests.make_driver import (
    DEFCONFIGS,
    NO_MAKE,
    PY,
    QUICK,
    QUICK_RUNS,
    ROOT,
    TIMEOUT,
    base_env,
    config_lines,
    defconfig_lines,
    kconfig_symbol,
    make,
    matrix_rows,
    one_error_line,
    output,
)

pytestmark = NO_MAKE


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


