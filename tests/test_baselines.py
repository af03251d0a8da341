"""Baseline forecasters on a synthetic cohort whose glucose obeys the package's own kinetics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.exceptions import NotFittedError

from forecast.baselines import (
    BASELINES,
    BaselineError,
    Forecaster,
    LinearTrendForecaster,
    PersistenceForecaster,
    PhysioForecaster,
    RidgeForecaster,
    load_baseline,
)
from forecast.insulin import carb_absorption, insulin_activity
from forecast.schema import GLUCOSE_MIN_MGDL, DatasetMeta, set_meta
from forecast.windows import WindowConfig, make_windows, split_chronological

CFG = WindowConfig()


def synthetic_cohort(
    n_subjects: int = 6,
    days: int = 4,
    *,
    seed: int = 0,
    noise: float = 3.0,
    drift_sd: float = 0.4,
    isf_range: tuple[float, float] = (30, 60),
    csf_range: tuple[float, float] = (3, 5),
    temp_basals: bool = True,
) -> pd.DataFrame:
    """Glucose driven by insulin above basal (−ISF × activity) and carbs (+CSF × absorption).

    Three meals a day with imperfect boluses, random temp basals, an AR(1) drift, slight mean
    reversion, CGM noise, missing readings and one long gap per subject.
    """
    rng = np.random.default_rng(seed)
    n = days * 288
    parts = []
    for s in range(n_subjects):
        isf, csf = rng.uniform(*isf_range), rng.uniform(*csf_range)
        basal = rng.uniform(0.05, 0.1)  # U per 5 min = 0.6 – 1.2 U/h
        carbs, bolus = np.zeros(n), np.zeros(n)
        for d in range(days):
            for hour in (7.5, 12.5, 19.0):
                k = d * 288 + int(hour * 12) + int(rng.integers(-6, 7))
                grams = rng.uniform(30, 90)
                carbs[k] = grams
                bolus[max(k + int(rng.integers(-3, 4)), 0)] += round(
                    grams * csf / isf * rng.uniform(0.6, 1.3), 1
                )
        rate = np.where(rng.random(n) < 0.1, rng.uniform(0, 2, n), 1.0) if temp_basals else 1.0
        basal_u = basal * rate * np.ones(n)
        act = insulin_activity(basal_u + bolus)
        absorbed = carb_absorption(carbs)
        g = np.empty(n)
        g[0] = rng.uniform(100, 160)
        drift = 0.0
        for t in range(1, n):
            drift = 0.95 * drift + rng.normal(0, drift_sd) if drift_sd else 0.0
            g[t] = (
                g[t - 1]
                - isf * (act[t - 1] - basal)
                + csf * absorbed[t - 1]
                + drift
                + 0.003 * (120 - g[t - 1])
            )
        cgm = np.clip(g + rng.normal(0, noise, n) if noise else g, 40, 400)
        if noise:
            cgm[rng.random(n) < 0.03] = np.nan
            k = int(rng.integers(0, n - 20))
            cgm[k : k + 12] = np.nan
        parts.append(
            pd.DataFrame(
                {
                    "subject_id": f"syn-{s}",
                    "time": pd.date_range("2024-03-01", periods=n, freq="5min", tz="UTC"),
                    "glucose": cgm,
                    "basal_u": basal_u,
                    "bolus_u": bolus,
                    "carbs_g": carbs,
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    set_meta(frame, DatasetMeta(source="synthetic", timezone="Europe/Paris"))
    return frame


@pytest.fixture(scope="module")
def data():
    parts = split_chronological(synthetic_cohort(), (0.7, 0.15, 0.15))
    return {k: make_windows(v, CFG) for k, v in parts.items()}


@pytest.fixture(scope="module")
def fitted(data):
    return {name: cls().fit(data["train"]) for name, cls in BASELINES.items()}


def rmse_at(model, windows, minutes: int) -> float:
    h = CFG.horizons_min.index(minutes)
    pred = model.predict(windows.past, windows.future)[:, h, 1]
    return float(np.sqrt(np.nanmean((pred - windows.target[:, h]) ** 2)))


# --------------------------------------------------------------------------- behaviour


def test_shapes_quantile_order_and_protocol(fitted, data):
    te = data["test"]
    for name, model in fitted.items():
        assert isinstance(model, Forecaster)
        assert model.config == CFG and model.quantiles == (0.05, 0.5, 0.95)
        pred = model.predict(te.past, te.future)
        assert pred.shape == (len(te), 12, 3) and pred.dtype == np.float32, name
        assert np.isfinite(pred).all()
        assert (np.diff(pred, axis=2) >= 0).all(), f"{name}: quantiles cross"
        # a 90 % interval from training residuals covers roughly 90 % of test readings
        ok = np.isfinite(te.target)
        cover = ((te.target >= pred[..., 0]) & (te.target <= pred[..., 2]))[ok].mean()
        assert 0.75 < cover < 0.98, (name, cover)


def test_ridge_and_physio_beat_persistence_at_30_min(fitted, data):
    te = data["test"]
    persistence = rmse_at(fitted["persistence"], te, 30)
    ridge = rmse_at(fitted["ridge"], te, 30)
    physio = rmse_at(fitted["physio"], te, 30)
    assert ridge < 0.85 * persistence, (ridge, persistence)
    assert physio < 0.9 * persistence, (physio, persistence)
    assert rmse_at(fitted["ridge"], te, 60) < rmse_at(fitted["persistence"], te, 60)


def test_persistence_and_linear_trend_are_what_they_say(data):
    te = data["test"]
    gi = CFG.past_index("glucose")
    p = PersistenceForecaster().fit(data["train"])
    pred = p.predict(te.past, te.future)
    np.testing.assert_allclose(
        pred[:, :, 1], np.clip(te.past[:, -1:, gi] + p.offsets_[None, :, 1], 20, 600), rtol=1e-6
    )
    # a perfect ramp of +2 mg/dL per 5 min is extrapolated exactly
    ramp = te.subset(np.arange(50))
    ramp.past[:, :, gi] = 100 + 2 * np.arange(24, dtype=np.float32)[None, :]
    ramp.past[:, :, CFG.past_index("observed")] = 1
    ramp.target[:] = 100 + 2 * np.arange(24, 36, dtype=np.float32)[None, :]
    lin = LinearTrendForecaster().fit(ramp)
    np.testing.assert_allclose(lin.predict(ramp.past, ramp.future)[:, :, 1], ramp.target, atol=1e-4)


def test_physio_recovers_isf_and_csf_on_clean_data():
    frame = synthetic_cohort(
        1,
        4,
        seed=3,
        noise=0.0,
        drift_sd=0.0,
        isf_range=(45, 45),
        csf_range=(4, 4),
        temp_basals=False,
    )
    w = make_windows(frame, CFG)
    model = PhysioForecaster().fit(w)
    assert model.isf_ == pytest.approx(45, rel=0.06)
    assert model.csf_ == pytest.approx(4, rel=0.06)
    given = PhysioForecaster(isf=30.0, csf=3.0, momentum_min=15.0, neutral="global").fit(w)
    assert (given.isf_, given.csf_, given.momentum_min_, given.neutral_) == (
        30.0,
        3.0,
        15.0,
        "global",
    )


def test_ridge_insulin_and_carb_coefficients_have_physiological_signs(fitted):
    ridge = fitted["ridge"]
    names = ridge.feature_names_
    for n in ("insulin_past", "insulin_planned"):
        assert (ridge.coef_[:, names.index(n)] <= 0).all()
    for n in ("carbs_past", "carbs_planned"):
        assert (ridge.coef_[:, names.index(n)] >= 0).all()
    # and the bound binds nowhere it is not needed: insulin from the past lowers glucose
    assert (ridge.coef_[4:, names.index("insulin_past")] < 0).all()


@pytest.mark.parametrize("name", ["physio", "ridge"])
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    i=st.integers(0, 10_000),
    extra_basal=arrays(np.float32, 12, elements=st.floats(0, 0.5, width=32)),
    extra_bolus=arrays(np.float32, 12, elements=st.floats(0, 8, width=32)),
)
def test_more_planned_insulin_never_raises_the_forecast(
    name, fitted, data, i, extra_basal, extra_bolus
):
    te = data["test"]
    model = fitted[name]
    k = i % len(te)
    past = np.repeat(te.past[k : k + 1], 2, axis=0)  # [2, L, F]
    future = np.repeat(te.future[k : k + 1], 2, axis=0)  # [2, H, F]
    future[1, :, CFG.future_index("basal_u")] += extra_basal
    future[1, :, CFG.future_index("bolus_u")] += extra_bolus
    pred = model.predict(past, future)
    assert (pred[1] <= pred[0]).all()
    # a real bolus early in the horizon does lower the forecast — unless the forecast already
    # sits at the plausible floor it is clipped to (a falling window near 20 mg/dL)
    if extra_bolus[:6].sum() > 1 and pred[0, -1, 1] > GLUCOSE_MIN_MGDL:
        assert pred[1, -1, 1] < pred[0, -1, 1]


# --------------------------------------------------------------------------- serialisation


def test_to_dict_from_dict_round_trip_is_exact(fitted, data, tmp_path):
    te = data["test"]
    for name, model in fitted.items():
        d = json.loads(json.dumps(model.to_dict()))  # numbers and lists only
        back = load_baseline(d)
        assert type(back) is type(model)
        assert np.array_equal(back.predict(te.past, te.future), model.predict(te.past, te.future))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(d))
        assert np.array_equal(
            load_baseline(path).predict(te.past[:5], te.future[:5]),
            model.predict(te.past[:5], te.future[:5]),
        )


def test_from_dict_rejects_tampered_models(fitted):
    d = fitted["ridge"].to_dict()
    bad = json.loads(json.dumps(d))
    j = bad["state"]["feature_names"].index("insulin_planned")
    for row in bad["state"]["coef"]:
        row[j] = 1.0
    with pytest.raises(BaselineError, match="sign"):
        load_baseline(bad)
    with pytest.raises(BaselineError, match="not 'physio'"):
        PhysioForecaster.from_dict(d)
    with pytest.raises(BaselineError, match="unknown baseline"):
        load_baseline({"name": "oracle"})
    with pytest.raises(BaselineError, match="unknown baseline"):
        load_baseline("oracle")
    broken = json.loads(json.dumps(fitted["physio"].to_dict()))
    del broken["state"]["isf"]
    with pytest.raises(BaselineError, match="malformed"):
        load_baseline(broken)


# --------------------------------------------------------------------------- boundaries


def test_validation_at_the_boundary(fitted, data):
    te = data["test"]
    with pytest.raises(NotFittedError):
        RidgeForecaster().predict(te.past, te.future)
    model = fitted["physio"]
    with pytest.raises(BaselineError, match="past must be"):
        model.predict(te.past[:, :10], te.future)
    with pytest.raises(BaselineError, match="future must be"):
        model.predict(te.past, te.future[:, :, :2])
    with pytest.raises(BaselineError, match="batch"):
        model.predict(te.past[:3], te.future[:4])
    fut = te.future[:2].copy()
    fut[0, 0, 0] = np.nan
    with pytest.raises(BaselineError, match="NaN"):
        model.predict(te.past[:2], fut)
    with pytest.raises(BaselineError, match="quantiles"):
        PersistenceForecaster(quantiles=(0.5, 0.1)).fit(te)
    with pytest.raises(BaselineError, match="no windows"):
        PersistenceForecaster().fit(te.subset(np.arange(0)))
    with pytest.raises(BaselineError, match="neutral"):
        PhysioForecaster(neutral="median").fit(te)


def test_calibrate_and_custom_quantiles(data):
    model = RidgeForecaster(quantiles=(0.1, 0.25, 0.5, 0.75, 0.9)).fit(data["train"])
    pred = model.predict(data["test"].past, data["test"].future)
    assert pred.shape[-1] == 5 and (np.diff(pred, axis=2) >= 0).all()
    before = model.offsets_.copy()
    model.calibrate(data["val"])
    assert model.offsets_.shape == before.shape and not np.array_equal(model.offsets_, before)
    assert RidgeForecaster().set_params(alpha=3.0).get_params()["alpha"] == 3.0
