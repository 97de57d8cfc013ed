"""Fixtures shared by several test modules (helpers that build data stay in the *_factory.py and
ingest_fixtures.py modules)."""

from __future__ import annotations

import pytest

from polyp_ssl.shards.cli_errors import DEBUG_ENV


@pytest.fixture
def debug_off(monkeypatch):
    """The dispatcher sets POLYP_SSL_DEBUG for --debug: keep that inside the test, and run with
    tracebacks off (one-line errors) whatever the caller's environment says."""
    monkeypatch.setenv(DEBUG_ENV, "0")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole test session (tests make their own buckets);
    see tests/object_store_helpers.py. Skipped where moto is not installed (the dev extra has it)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from object_store_helpers import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process's environment pointed at the test S3 server (endpoint, throwaway keys)."""
    env = s3_server.environ()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
