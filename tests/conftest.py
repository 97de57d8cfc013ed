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
