"""Rows of tests/test_bad_input.py for recipes and data: out-of-range recipe values, bad bytes, bad shards."""

from __future__ import annotations

from test_bad_input import Case  # noqa: F401

CASES: list = []
