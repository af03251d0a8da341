"""Insulin pump: units that mean what they say, limits that bind, occlusions that bite."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forecast.sim import Pump, PumpConfig, SimInputError


def test_insulet_reads_the_csv_in_device_units():
    c = PumpConfig.named("Insulet")
    assert (c.bolus_increment_u, c.basal_increment_u_per_h) == (0.05, 0.05)
    assert (c.max_bolus_u, c.max_basal_u_per_h) == (30.0, 30.0)
    assert PumpConfig.named("cozmo").max_bolus_u == 75.0
    with pytest.raises(SimInputError, match="unknown pump"):
        PumpConfig.named("Medtronic 780G")


def test_limits_bind_and_are_reported():
    pump = Pump(PumpConfig.named("Insulet"), 3)
    d = pump.deliver(60, np.array([1.0, 45.0, 1.0]), np.array([2.0, 0.0, 50.0]))
    assert d.commanded_bolus_u[2] == 30.0  # max bolus 30 U
    assert d.commanded_basal_u[1] == pytest.approx(30.0)  # 30 U/h for an hour
    assert list(d.limited) == [False, True, True]
    total = d.insulin_u_per_min.sum(axis=1)
    np.testing.assert_allclose(total, [1.0 + 2.0, 30.0, 1.0 + 30.0])


def test_increments_basal_nearest_bolus_down():
    pump = Pump(PumpConfig.named("Insulet"), 2)
    d = pump.deliver(60, np.array([0.8361, 0.8249]), np.array([1.049, 2.0999]))
    np.testing.assert_allclose(d.commanded_basal_u, [0.85, 0.80])
    np.testing.assert_allclose(d.commanded_bolus_u, [1.0, 2.05])


def test_bolus_speed_carries_into_next_step():
    pump = Pump(PumpConfig.named("Insulet"), 1)  # 1.5 U/min
    d1 = pump.deliver(5, np.array([0.0]), np.array([10.0]))
    assert d1.bolus_u[0] == pytest.approx(7.5)
    np.testing.assert_allclose(d1.insulin_u_per_min[0], 1.5)
    d2 = pump.deliver(5, np.array([0.0]), np.array([0.0]))
    assert d2.bolus_u[0] == pytest.approx(2.5)
    assert pump.pending_bolus_u[0] == 0.0


def test_occlusion_delivers_less_than_commanded_and_clears():
    pump = Pump(PumpConfig.named("Insulet"), 2)
    pump.occlude(np.array([False, True]), fraction=0.25, minutes=60)
    d = pump.deliver(30, np.array([1.2, 1.2]), np.array([3.0, 3.0]))
    np.testing.assert_allclose(d.commanded_basal_u, [0.6, 0.6])
    np.testing.assert_allclose(d.basal_u, [0.6, 0.15])
    np.testing.assert_allclose(d.bolus_u, [3.0, 0.75])
    pump.deliver(30, np.array([1.2, 1.2]), np.array([0.0, 0.0]))
    d = pump.deliver(30, np.array([1.2, 1.2]), np.array([0.0, 0.0]))
    np.testing.assert_allclose(d.basal_u, [0.6, 0.6])  # cleared after 60 min


def test_random_occlusions_happen_at_the_configured_rate():
    cfg = PumpConfig.named("Insulet", occlusion_prob_per_day=0.5, occlusion_hours=2.0)
    pump = Pump(cfg, 400, np.arange(400))
    hit = np.zeros(400, bool)
    for _ in range(288):
        d = pump.deliver(5, np.full(400, 1.0), np.zeros(400))
        hit |= d.basal_u < d.commanded_basal_u
    assert 0.3 < hit.mean() < 0.7


def test_bad_config():
    with pytest.raises(SimInputError):
        PumpConfig(max_bolus_u=0)
    with pytest.raises(SimInputError):
        PumpConfig(occlusion_delivery_fraction=2.0)
    with pytest.raises(SimInputError):
        Pump(PumpConfig(), 1).occlude(np.array([True]), fraction=-0.1)


@settings(max_examples=40, deadline=None)
@given(
    basal=st.floats(0.0, 40.0),
    bolus=st.floats(0.0, 40.0),
    k=st.integers(1, 30),
)
def test_never_more_than_commanded_or_the_limits(basal, bolus, k):
    cfg = PumpConfig.named("Insulet")
    pump = Pump(cfg, 1)
    d = pump.deliver(k, np.array([basal]), np.array([bolus]))
    assert d.commanded_bolus_u[0] <= min(bolus, cfg.max_bolus_u) + 1e-9
    assert d.basal_u[0] <= min(basal, cfg.max_basal_u_per_h) * k / 60 + 0.025 * k / 60 + 1e-9
    assert d.bolus_u[0] + pump.pending_bolus_u[0] == pytest.approx(d.commanded_bolus_u[0])
    assert (d.insulin_u_per_min >= 0).all()
