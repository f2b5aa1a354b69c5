"""The operating point: calibration and a threshold that transfers, on synthetic score sets.

Each synthetic "model" ranks its films equally well (the same class-conditional
logits) but puts them on its own scale (temperature and offset), as networks
trained on different folds do: a threshold carried on the raw score from one
to another misses its sensitivity, one carried on the calibrated probability
keeps it.
"""

import numpy as np
import pytest

from model.metrics import calibration_figures, expected_calibration_error
from model.operating_point import (
    Platt,
    design_sensitivity,
    fit_platt,
    fold_into_dense,
    sigmoid,
    transferable_threshold,
)

SCALES = [(1.0, 0.0), (3.0, 2.0), (0.5, -1.0), (2.0, 1.0)]


def _model_scores(rng, temperature: float, offset: float, n: int = 1500):
    labels = (rng.random(n) < 0.74).astype(int)
    z = np.where(labels == 1, rng.normal(2.5, 1.2, n), rng.normal(-2.5, 1.2, n))
    return labels, sigmoid(temperature * z + offset)


def test_platt_recovers_a_known_miscalibration():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20000)
    labels = (rng.random(z.size) < sigmoid(z)).astype(int)  # sigmoid(z) is the true probability
    overconfident = sigmoid(3 * z + 1)
    platt = fit_platt(labels, overconfident)
    assert platt.slope == pytest.approx(1 / 3, rel=0.08)
    assert platt.intercept == pytest.approx(-1 / 3, abs=0.08)
    before, after = calibration_figures(labels, overconfident), calibration_figures(labels, platt(overconfident))
    assert after["ece"] < 0.02 < before["ece"]
    assert after["brier"] < before["brier"]


def test_expected_calibration_error_of_perfect_and_of_constant_scores():
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(labels, labels.astype(float)) == 0.0
    assert expected_calibration_error(labels, np.full(4, 0.9)) == pytest.approx(0.4)


def test_calibration_refuses_one_class_and_inverted_scores():
    with pytest.raises(ValueError, match="both classes"):
        fit_platt(np.ones(10), np.linspace(0.1, 0.9, 10))
    with pytest.raises(ValueError, match="wrong way round"):
        fit_platt(np.array([0] * 50 + [1] * 50), np.concatenate([np.linspace(0.6, 0.9, 50), np.linspace(0.1, 0.4, 50)]))


def test_the_calibrated_threshold_transfers_to_a_model_it_was_not_chosen_on():
    rng = np.random.default_rng(7)
    sets = [(f"model {i}", *_model_scores(rng, *scale)) for i, scale in enumerate(SCALES)]
    op = transferable_threshold(sets, target_sensitivity=0.97, bootstrap=200, seed=3)

    # carried on the raw score, the threshold lands far from the target on some model
    assert op["transfer_raw"]["sensitivity"]["min"] < 0.9
    assert op["own_thresholds_raw"]["max"] - op["own_thresholds_raw"]["min"] > 0.5
    # carried on the calibrated probability, every model keeps (about) its sensitivity
    assert op["transfer"]["sensitivity"]["min"] > 0.95
    assert op["own_thresholds"]["max"] - op["own_thresholds"]["min"] < 0.15
    assert op["ci95"][0] <= op["threshold"] <= op["ci95"][1]
    assert op["pooled"]["sensitivity"] >= 0.97

    # and on a fresh model, never seen, after its own calibration on a labelled sample of it
    labels, scores = _model_scores(rng, 4.0, -2.0)
    calibration_sample = slice(0, 500)
    platt = fit_platt(labels[calibration_sample], scores[calibration_sample])
    unseen = platt(scores[500:]) >= op["threshold"]
    assert unseen[labels[500:] == 1].mean() > 0.95


#: Models that differ in how well they rank, not only in scale: (pneumonia logit mean, temperature, offset).
UNEQUAL = [(2.5, 1.0, 0.0), (1.8, 3.0, 2.0), (3.2, 0.5, -1.0), (2.2, 2.0, 1.0), (2.9, 1.5, 0.5), (2.0, 1.0, -0.5)]


def _unequal_model_scores(rng, separation: float, temperature: float, offset: float, n: int = 1500):
    labels = (rng.random(n) < 0.74).astype(int)
    z = np.where(labels == 1, rng.normal(separation, 1.2, n), rng.normal(-2.5, 1.2, n))
    return labels, sigmoid(temperature * z + offset)


@pytest.mark.parametrize("seed", [0, 4])
def test_the_margin_keeps_the_target_on_sets_it_was_not_chosen_on_where_the_pooled_threshold_does_not(seed):
    """Where held-out sets differ in how well their model ranks, the pooled threshold for 0.97 leaves
    the worst left-out set well under 0.97; the design sensitivity, found on the other sets alone,
    brings every left-out set to the target or within a film or two of it, for some specificity."""
    rng = np.random.default_rng(seed)
    sets = [(f"model {i}", *_unequal_model_scores(rng, *u)) for i, u in enumerate(UNEQUAL)]
    pooled = transferable_threshold(sets, target_sensitivity=0.97, margin=False, bootstrap=50)
    kept = transferable_threshold(sets, target_sensitivity=0.97, bootstrap=50)

    assert pooled["design_sensitivity"] == 0.97
    assert pooled["transfer"]["sensitivity"]["min"] < 0.96
    assert 0.975 <= kept["design_sensitivity"] < 0.995
    assert kept["transfer"]["sensitivity"]["min"] >= 0.965
    assert kept["transfer"]["sensitivity"]["min"] > pooled["transfer"]["sensitivity"]["min"] + 0.01
    assert kept["threshold"] < pooled["threshold"]
    assert kept["pooled"]["sensitivity"] >= kept["design_sensitivity"]
    assert 0.9 < kept["transfer"]["specificity"]["mean"] < pooled["transfer"]["specificity"]["mean"]
    # each left-out set's rule saw only the others
    assert all(0.97 <= row["design_sensitivity"] < 0.995 for row in kept["transfer"]["sets"])


def test_the_design_sensitivity_is_the_target_for_one_set_and_grows_with_the_sets_disagreement():
    rng = np.random.default_rng(2)
    alike = [_model_scores(rng, 1.0, 0.0) for _ in range(4)]
    unequal = [_unequal_model_scores(rng, *u) for u in UNEQUAL[:4]]
    calibrated = [[(labels, fit_platt(labels, scores)(scores)) for labels, scores in group] for group in (alike, unequal)]
    assert design_sensitivity(calibrated[0][:1], 0.97) == 0.97
    assert 0.97 <= design_sensitivity(calibrated[0], 0.97) < design_sensitivity(calibrated[1], 0.97)


def test_a_transferable_threshold_needs_two_sets():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least two"):
        transferable_threshold([("only", *_model_scores(rng, 1.0, 0.0))], target_sensitivity=0.97)


def test_the_calibration_folded_into_the_output_layer_is_what_the_network_then_returns():
    import keras

    from model.network import build_network

    keras.utils.set_random_seed(0)
    model = build_network(64, augment=False)
    x = np.random.default_rng(0).random((6, 64, 64, 3)).astype(np.float32)
    before = np.asarray(model(x, training=False)).reshape(-1)
    platt = Platt(slope=2.5, intercept=-0.7)
    fold_into_dense(model, platt)
    after = np.asarray(model(x, training=False)).reshape(-1)
    np.testing.assert_allclose(after, platt(before), rtol=1e-4, atol=1e-6)
