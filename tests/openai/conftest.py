"""Shared fixtures: the server started by check.sh (JANUS_HTTP_URL, JANUS_API_KEY)."""
import base64
import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def base_url() -> str:
    return os.environ["JANUS_HTTP_URL"]


@pytest.fixture(scope="session")
def api_key() -> str:
    return os.environ["JANUS_API_KEY"]


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["JANUS_FIXTURE"])


@pytest.fixture(scope="session")
def out_dir() -> pathlib.Path:
    p = pathlib.Path(os.environ["JANUS_TEST_OUTPUT"])
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="session")
def image_data_uri(fixture_dir) -> str:
    data = (fixture_dir / "square.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode()
