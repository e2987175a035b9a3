import contextlib
import os
import sys
from pathlib import Path

import pytest

from fmct_ray.testing import LOOPBACK_RAY_ENV, S3Server

os.environ.update(LOOPBACK_RAY_ENV)  # every Ray cluster a test starts stays on 127.0.0.1

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.exists():
        pytest.skip(f"real CT data not found at {REAL} (../shared beside the repository)")
    return REAL


@contextlib.contextmanager
def serve_s3():
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with its credentials in the env."""
    with S3Server() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        yield server
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3():
    """The session's S3 server (`serve_s3`), shared by the tests: give each test a bucket of its own."""
    with serve_s3() as server:
        yield server


@pytest.fixture
def site_secret(monkeypatch):
    monkeypatch.setenv("FMCT_SITE_SECRET", "test-secret-of-site")
    return "test-secret-of-site"


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_behind():
    """A module whose tests start Ray in this process (a library call that initialises it, such as
    `run_ingest`) leaves no Ray behind: the next module's `ray.init(num_cpus=2)` would fail."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
