from __future__ import annotations

import numpy as np
import pytest

from curate.stages.budget.repeat import internvl_copies, solve_repeat_factors, stable_copies


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
    r = solve_repeat_factors({"a": 1000, "b": 4000}, 10_000, {"a": 1, "b": 1})
    assert r == pytest.approx({"a": 5.0, "b": 1.25})
    r = solve_repeat_factors({"a": 1000, "b": 4000, "c": 0}, 10_000)
    assert r["c"] == 0.0 and r["a"] * 1000 == pytest.approx(10_000 / 3)
    with pytest.raises(ValueError):
        solve_repeat_factors({"a": 1}, 10, {"zzz": 1})
