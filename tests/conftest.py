"""The pytest side of the shared harness (tests/harness.py): its names re-exported, so
tests keep `from conftest import ...`, and the per-test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import *  # noqa: F403
from harness import Env


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path, tmp_path / "server-home", tmp_path / "client-home",
            tmp_path / "server-received", tmp_path / "client-received", tmp_path / "assets")
    e.assets.mkdir()
    e._servers = []
    yield e
    for srv in e._servers:
        srv.stop()
