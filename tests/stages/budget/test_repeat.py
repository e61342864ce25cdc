from __future__ import annotations

import numpy as np
import pytest

from curate.core.errors import CurateError
from curate.stages.budget.repeat import (
    MixtureError,
    internvl_copies,
    solve_repeat_factors,
    stable_copies,
)


def test_internvl_first_n_lines():
    lines = np.arange(1, 11)
    # r < 1: the first int(10 * 0.35) = 3 lines of the file, as InternVL slices raw_data.
    assert internvl_copies(lines, 10, 0.35).tolist() == [1, 1, 1] + [0] * 7
    assert internvl_copies(lines, 10, 3).tolist() == [3] * 10
    assert internvl_copies(lines, 10, 2.7).tolist() == [2] * 10  # InternVL takes int(r)
    # Line numbers count bad lines too: kept samples at lines 2 and 9 of a 10-line file.
    assert internvl_copies(np.array([2, 9]), 10, 0.5).tolist() == [1, 0]


def test_stable_fractional_is_stable_and_calibrated():
    ids = [f"s{i}" for i in range(20_000)]
    a = stable_copies(ids, 1.3, seed=7)
    assert stable_copies(ids, 1.3, seed=7).tolist() == a.tolist()  # reruns agree
    assert set(a.tolist()) == {1, 2}
    assert abs(a.mean() - 1.3) < 0.02
    # A sample's copies do not depend on which other samples are present.
    assert stable_copies(ids[:100], 1.3, seed=7).tolist() == a[:100].tolist()
    assert stable_copies(ids, 1.3, seed=8).tolist() != a.tolist()


def test_solver_hits_target_shares():
    r = solve_repeat_factors({"a": 1000, "b": 4000}, 10_000, {"a": 1, "b": 1}, basis="equal")
    assert r == pytest.approx({"a": 5.0, "b": 1.25})
    r = solve_repeat_factors({"a": 1000, "b": 4000, "c": 0}, 10_000, basis="equal")
    assert r["c"] == 0.0 and r["a"] * 1000 == pytest.approx(10_000 / 2)
    with pytest.raises(ValueError):
        solve_repeat_factors({"a": 1}, 10, {"zzz": 1})


def test_datasets_not_named_in_weights_keep_weight_one():
    """The README's example names one dataset: the others keep weight 1, never r = 0."""
    tokens = {"a": 1000, "b": 4000, "c": 2000}
    r = solve_repeat_factors(tokens, 12_000, {"a": 2}, basis="equal")
    got = {d: r[d] * n for d, n in tokens.items()}
    assert got == pytest.approx({"a": 6000, "b": 3000, "c": 3000})
    r = solve_repeat_factors(tokens, 12_000, {"a": 2}, basis="natural")
    assert all(v > 0 for v in r.values())


def test_natural_weights_scale_the_meta_mixture():
    """natural: r = s * weight * repeat_time, one s for all datasets so the total is the target;
    weight 1 everywhere keeps the meta JSON's proportions."""
    tokens = {"a": 1000, "b": 4000, "c": 2000}
    repeat_times = {"a": 1.0, "b": 1.0, "c": 0.5}
    r = solve_repeat_factors(tokens, 12_000, basis="natural", repeat_times=repeat_times)
    assert sum(r[d] * n for d, n in tokens.items()) == pytest.approx(12_000)
    # Before: 1000 : 4000 : 1000 tokens (c at repeat_time 0.5); after, the same shares.
    assert {d: r[d] * n for d, n in tokens.items()} == pytest.approx(
        {"a": 2000, "b": 8000, "c": 2000}
    )
    r = solve_repeat_factors(tokens, 12_000, {"c": 4}, basis="natural", repeat_times=repeat_times)
    # c's share grows 4x relative to the others: 1000 : 4000 : 4000.
    assert {d: r[d] * n for d, n in tokens.items()} == pytest.approx(
        {"a": 12_000 / 9, "b": 48_000 / 9, "c": 48_000 / 9}
    )


def test_equal_basis_ignores_size_and_repeat_time():
    tokens = {"a": 1000, "b": 4000, "empty": 0}
    r = solve_repeat_factors(tokens, 10_000, basis="equal", repeat_times={"a": 3.0, "b": 0.1})
    # An empty dataset gets r = 0 and does not take a share from the others.
    assert r == pytest.approx({"a": 5.0, "b": 1.25, "empty": 0.0})


def test_unknown_dataset_in_weights_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(MixtureError) as e:
        solve_repeat_factors({"a": 1, "b": 2}, 10, {"nosuch": 2})
    message = str(e.value)
    assert isinstance(e.value, CurateError) and "\n" not in message
    assert "nosuch" in message and "'a'" in message and "'b'" in message


def test_zero_weights_everywhere_is_an_error():
    with pytest.raises(MixtureError, match="zero"):
        solve_repeat_factors({"a": 1, "b": 2}, 10, {"a": 0, "b": 0})


def test_weights_without_a_target_are_refused():
    from pydantic import ValidationError

    from curate.stages.budget.config import BudgetConfig

    with pytest.raises(ValidationError, match="weights need target_tokens"):
        BudgetConfig(weights={"a": 2})
    assert BudgetConfig(weights={"a": 2}, target_tokens=10).weight_basis == "natural"
