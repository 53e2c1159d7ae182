"""Fixtures of the tabular tests; the tables themselves come from tabular_credit.py."""

from __future__ import annotations

import pytest
from tabular_credit import credit_schema

from fortify.tabular.schema import Schema


@pytest.fixture(scope="session")
def schema() -> Schema:
    return credit_schema()
