"""Each package re-exports its public names in ``__all__`` (as httpx checks its own); ruff's RUF022 keeps it
sorted."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["billing", "config", "gateway", "gateway.sim"])
def test_exported_members_exist(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert len(set(exported)) == len(exported), f"{package}.__all__ lists a name twice"
    for name in exported:
        assert hasattr(module, name), f"{package}.{name} is exported but missing"
