"""Counterfactual twins (training/twins.py): true changes with the right sign and size, and
the training wiring that lets only the twins move the insulin-effect head."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from forecast.windows import WindowConfig, add_features, make_windows  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.interventional import InterventionalError  # noqa: E402
from training.module import ForecastModule, pinball_loss  # noqa: E402
from training.pipeline import _spec  # noqa: E402
from training.synthetic import replay_cohort  # noqa: E402
from training.twins import make_twins  # noqa: E402


@pytest.fixture(scope="module")
def sim():
    frame = add_features(replay_cohort("adult#002,child#003", days=1.5, seed=4))
    return frame, make_windows(frame, WindowConfig())


def test_twins_change_glucose_the_way_insulin_does(sim):
    frame, w = sim
    tw = make_twins(frame, w, n=400, seed=1)
    assert 300 <= len(tw) <= 400
    cfg = w.config
    ib, il = cfg.future_index("basal_u"), cfg.future_index("bolus_u")
    d_ins = (tw.future_twin[:, :, ib] + tw.future_twin[:, :, il]) - (
        tw.future[:, :, ib] + tw.future[:, :, il]
    )  # [N, H] U per slot added
    more = d_ins.sum(1) > 0.05
    less = d_ins.sum(1) < -0.05
    assert more.sum() > 50 and less.sum() > 20
    # insulin acts with a lag: nothing at 5 min, a fall at 60 min after more insulin, a rise
    # (or nothing yet) after less
    assert np.abs(tw.change[:, 0]).max() < 0.5
    assert (tw.change[more, -1] < 0).mean() > 0.95
    assert (tw.change[less, -1] > -1e-6).mean() > 0.95
    # a unit given in the first half hour lowers glucose measurably by the end of the hour
    per_u = tw.change[more, -1] / d_ins[more].sum(1)
    assert np.median(per_u) < -0.3


def test_twins_need_simulator_subjects(sim):
    frame, w = sim
    frame = frame.assign(subject_id=frame["subject_id"].str.replace("#", "-"))
    w2 = make_windows(frame, WindowConfig())
    with pytest.raises(InterventionalError, match="simulator data"):
        make_twins(frame, w2, n=10)


def test_only_the_twins_move_the_insulin_head(sim):
    frame, w = sim
    cfg = TrainConfig()
    spec = _spec(cfg, cfg.window_config())
    module = ForecastModule(spec)
    module.model.fit_normalisation(w.past, w.future, w.target)
    module.set_twins(make_twins(frame, w, n=200, seed=2))
    batch = tuple(torch.from_numpy(a[:128]) for a in (w.past, w.future, w.target))
    head = module.model.insulin_parameters()

    loss, _, _ = module._loss(batch)
    grads = torch.autograd.grad(loss, head, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    twin = module.twin_loss(64)
    grads = torch.autograd.grad(twin, head, allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0.0 for g in grads)

    # without twins the forecast loss does reach the head (the confounded path)
    plain = ForecastModule(spec)
    plain.model.fit_normalisation(w.past, w.future, w.target)
    pred = plain.model(batch[0], batch[1])
    loss = pinball_loss(pred, batch[2], plain.quantiles, plain.model.delta_scale)
    grads = torch.autograd.grad(loss, plain.model.insulin_parameters(), allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0.0 for g in grads)
