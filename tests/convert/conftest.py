"""The ``megatron`` marker, registered here so these tests run without the project's marker list."""

from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "megatron: needs megatron-core (make test-megatron)")
