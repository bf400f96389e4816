"""Sample-level accounting against published values (Opacus's own test vectors)."""

import math

import pytest

from privacy.accountants import PrivacyBudgetError, calibrate_noise_multiplier, epsilon_for_history


def test_rdp_matches_opacus_accountants_test_vector():
    # opacus/tests/accountants_test.py: RDP, noise 1.5, q 0.04, 2250 steps, delta 1e-5.
    assert epsilon_for_history([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911117143, abs=1e-9)


def test_rdp_matches_opacus_docstring_value_with_its_orders():
    # Opacus RDP analysis docstring: noise 1.0, q 0.01, 300 steps, orders (2,5,10,20,100) -> 2.39.
    eps = epsilon_for_history([(1.0, 0.01, 300)], 1e-5, orders=[2, 5, 10, 20, 100])
    assert round(eps, 2) == 2.39


def test_composition_of_split_history_equals_one_entry():
    whole = epsilon_for_history([(1.1, 0.05, 400)], 1e-5)
    split = epsilon_for_history([(1.1, 0.05, 150), (1.1, 0.05, 250)], 1e-5)
    assert split == pytest.approx(whole, rel=1e-12)
    assert epsilon_for_history([(1.1, 0.05, 150)], 1e-5) < whole


def test_edge_cases():
    assert epsilon_for_history([], 1e-5) == 0.0
    assert math.isinf(epsilon_for_history([(0.0, 0.1, 10)], 1e-5))
    with pytest.raises(PrivacyBudgetError, match="delta"):
        epsilon_for_history([(1.0, 0.1, 10)], 1.5)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_spends_at_most_the_target(target):
    sigma = calibrate_noise_multiplier(target, 1e-5, 0.02, 1000)
    eps = epsilon_for_history([(sigma, 0.02, 1000)], 1e-5)
    assert target - 0.011 <= eps <= target
    # Monotone: a smaller budget needs more noise.
    assert calibrate_noise_multiplier(target / 2, 1e-5, 0.02, 1000) > sigma


def test_calibration_rejects_bad_arguments():
    for args, match in [((0, 1e-5, 0.1, 10), "epsilon"), ((1, 0, 0.1, 10), "delta"),
                        ((1, 1e-5, 1.5, 10), "sampling rate"), ((1, 1e-5, 0.1, 0), "steps")]:
        with pytest.raises(PrivacyBudgetError, match=match):
            calibrate_noise_multiplier(*args)
