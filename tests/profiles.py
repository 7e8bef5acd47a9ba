"""The two hypothesis profiles the property and fuzz tests run under, and how to run one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: CI: the same examples every run (derandomized, no example database); ``slow``: 20 times more
PROFILE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
SLOW_FACTOR = 20
#: every test runs once per profile; the big one is marked ``slow``
profiles = pytest.mark.parametrize("profile", ["ci", pytest.param("slow", marks=pytest.mark.slow)])


def run_examples(profile: str, cases: st.SearchStrategy, check: Callable, examples: int) -> None:
    """Check ``check(case)`` on ``examples`` examples of ``cases`` (``SLOW_FACTOR`` times more
    in the slow profile)."""
    count = examples * (SLOW_FACTOR if profile == "slow" else 1)
    settings(PROFILE, max_examples=count)(given(cases)(check))()
