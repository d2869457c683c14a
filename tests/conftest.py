"""Shared fixtures: both async backends, a model cache, and daemons on real sockets."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemon_proc import DaemonProcess, daemon_in_short_dir, short_tmpdir


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole run: the built-in models are generated once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = short_tmpdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def daemon(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[DaemonProcess]:
    """A daemon serving the tiny built-in model, on each server backend."""
    yield from daemon_in_short_dir(model_cache, backend=str(request.param))
