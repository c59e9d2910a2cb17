"""`min_budget` is checked once, in the base class, for every registered method: a token budget below it is a
one-line DapqError that names what the budget must hold; the minimum itself builds; ratios are left to the engine."""

from __future__ import annotations

import pytest

from dapq.errors import DapqError
from dapq.methods import get_method, list_methods
from dapq.methods.base import method_class

# parameters that make each method's floor above 1 (the defaults leave some at 1)
RAISED = {"dapq": {"keep_recent": 6}, "learned": {"keep_recent": 6}, "kvzip": {"n_sink": 4}}


def evicting() -> list[str]:
    return [name for name in list_methods() if method_class(name).evicts]


@pytest.mark.parametrize("name", evicting())
def test_a_budget_below_min_budget_is_refused_and_the_minimum_builds(name):
    params = RAISED.get(name, {})
    method = get_method(name, budget=0.5, **params)  # a ratio: never refused at construction
    low = method.min_budget
    if method.min_budget_reason == ("", "", ""):  # nothing reserved inside the budget (SpecKV): any budget >= 1
        assert low == 1 and get_method(name, budget=1, **params).budget == 1
        return
    assert low > 1, f"{name}: raise a parameter in RAISED so the test checks something"
    assert get_method(name, budget=low, **params).min_budget == low
    with pytest.raises(DapqError) as err:
        get_method(name, budget=low - 1, **params)
    message = str(err.value)
    assert f"budget ({low - 1})" in message and f"at least {low}" in message and "\n" not in message
    what, param, _ = get_method(name, budget=low, **params).min_budget_reason
    assert what and param.split()[0] in message, f"{name}: the error names what the budget holds"


def test_a_subclass_without_its_own_validation_is_checked_too():
    """LAQ++ and the reference variants inherit LAQ's validation; the check runs once, after all of it."""
    for name in ("laq++", "laq_reference", "laq++_reference", "pyramidkv"):
        cls = method_class(name)
        low = cls(budget=0.5).min_budget
        with pytest.raises(DapqError, match=f"at least {low}"):
            cls(budget=low - 1)
