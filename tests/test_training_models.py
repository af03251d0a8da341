"""Deep forecaster internals: shapes, quantile order, the monotone insulin head, the loss,
conformal calibration, and the configuration's validation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from training.calibration import conformal_calibrate, predict_numpy  # noqa: E402
from training.config import ConfigError, TrainConfig, load_config  # noqa: E402
from training.models import Layout, build_model  # noqa: E402
from training.models.common import insulin_effect_prior  # noqa: E402
from training.module import median_mse, pinball_loss  # noqa: E402

torch.set_num_threads(1)

PAST = (
    "glucose",
    "observed",
    "basal_u",
    "bolus_u",
    "carbs_g",
    "iob_u",
    "cob_g",
    "tod_sin",
    "tod_cos",
)
FUTURE = ("basal_u", "bolus_u", "carbs_g", "tod_sin", "tod_cos")


def layout(L=12, H=6, q=(0.05, 0.5, 0.95)) -> Layout:
    return Layout(PAST, FUTURE, L, H, q, carb_head=True)  # the default configuration


def raw_inputs(B: int, L: int, H: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plausible raw-unit windows: glucose 60-300 mg/dL, basal ~0.1 U/slot, sparse boluses."""
    g = torch.Generator().manual_seed(seed)
    past = torch.zeros(B, L, len(PAST))
    past[..., 0] = 60 + 240 * torch.rand(B, 1, generator=g) + 5 * torch.randn(B, L, generator=g)
    past[..., 1] = 1.0
    past[..., 2] = 0.1
    past[..., 3] = (torch.rand(B, L, generator=g) < 0.05) * 3.0
    past[..., 4] = (torch.rand(B, L, generator=g) < 0.03) * 40.0
    past[..., 5] = 2 * torch.rand(B, L, generator=g)
    past[..., 6] = 30 * torch.rand(B, L, generator=g)
    ang = 2 * torch.pi * torch.rand(B, 1, generator=g)
    past[..., 7], past[..., 8] = torch.sin(ang), torch.cos(ang)
    future = torch.zeros(B, H, len(FUTURE))
    future[..., 0] = 0.1
    future[..., 1] = (torch.rand(B, H, generator=g) < 0.05) * 2.0
    future[..., 2] = (torch.rand(B, H, generator=g) < 0.05) * 30.0
    future[..., 3], future[..., 4] = torch.sin(ang), torch.cos(ang)
    return past, future


def fitted(kind: str, lay: Layout, seed: int = 0):
    torch.manual_seed(seed)
    m = build_model(kind, lay, {}, {}).eval()
    past, future = raw_inputs(256, lay.past_slots, lay.horizon_slots, seed)
    target = past[:, -1:, 0] + 10 * torch.randn(256, lay.horizon_slots)
    m.fit_normalisation(past.numpy(), future.numpy(), target.numpy())
    return m


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@pytest.mark.parametrize("q", [(0.05, 0.5, 0.95), (0.1, 0.25, 0.5, 0.75, 0.9)])
def test_forward_shape_and_ordered_quantiles(kind, q):
    lay = layout(L=12, H=6, q=q)
    m = fitted(kind, lay)
    past, future = raw_inputs(7, 12, 6, seed=3)
    y = m(past, future)
    assert y.shape == (7, 6, len(q))
    assert torch.isfinite(y).all()
    assert (torch.diff(y, dim=-1) >= 0).all(), "quantiles must be ordered"


def test_median_is_relative_to_last_glucose():
    """The free part predicts a change: shifting the whole past glucose shifts the forecast
    by about as much (the normalised input moves too, so not exactly)."""
    m = fitted("lstm", layout())
    past, future = raw_inputs(4, 12, 6)
    y = m(past, future)[..., 1]
    assert torch.allclose(y[:, 0], past[:, -1, 0], atol=60), (
        "first step stays near the last reading"
    )


MODELS = {k: fitted(k, layout(), seed=1) for k in ("lstm", "transformer")}


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    slot=st.integers(0, 5),
    extra=st.floats(0.01, 20.0),
    which=st.sampled_from(["basal_u", "bolus_u"]),
)
def test_more_planned_insulin_never_raises_any_quantile(kind, seed, slot, extra, which):
    m = MODELS[kind]
    past, future = raw_inputs(16, 12, 6, seed=seed)
    more = future.clone()
    more[:, slot, FUTURE.index(which)] += extra
    with torch.no_grad():
        base, after = m(past, future), m(past, more)
    assert (after <= base + 1e-4).all()
    # and it has an effect at or after the slot (the head is not trivially zero)
    assert (after[:, slot:, 1] < base[:, slot:, 1]).any()


def test_insulin_prior_is_causal_and_growing():
    p = insulin_effect_prior(12, 5, 75.0, 360.0)
    assert np.allclose(np.triu(p, 1), 0)  # future insulin cannot act on earlier targets
    assert (p >= 0).all() and (p <= 1).all()
    assert (np.diff(p[:, 0]) > 0).all()  # a dose's realised effect grows with the lag


def test_pinball_loss_values_and_mask():
    q = torch.tensor([0.1, 0.5, 0.9])
    scale = torch.ones(2)
    pred = torch.tensor([[[90.0, 100.0, 110.0], [90.0, 100.0, 110.0]]])  # [1, 2, 3]
    target = torch.tensor([[120.0, float("nan")]])
    # only h=0 counts; errors y - p = 30, 20, 10 -> 0.1*30, 0.5*20, 0.9*10
    want = (3.0 + 10.0 + 9.0) / 3
    assert pinball_loss(pred, target, q, scale).item() == pytest.approx(want)
    below = torch.tensor([[80.0, float("nan")]])  # y - p = -10, -20, -30 -> 0.9*10, 0.5*20, 0.1*30
    assert pinball_loss(pred, below, q, scale).item() == pytest.approx((9.0 + 10.0 + 3.0) / 3)
    pred.requires_grad_(True)
    pinball_loss(pred, target, q, scale).backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[0, 1] == 0).all()


def test_median_mse_values_mask_and_scale():
    median = torch.tensor([[100.0, 100.0, 100.0]])  # [1, 3]
    target = torch.tensor([[110.0, float("nan"), 80.0]])
    scale = torch.tensor([10.0, 1.0, 20.0])
    # (10 / 10)^2 and (20 / 20)^2 over the two real readings
    assert median_mse(median, target, scale).item() == pytest.approx(1.0)
    median.requires_grad_(True)
    median_mse(median, target, scale).backward()
    assert median.grad[0, 1] == 0 and median.grad[0, 0] < 0 < median.grad[0, 2]


def test_pinball_loss_is_minimised_by_the_quantile():
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.normal(0, 1, (4000, 1))).float()
    q = torch.tensor([0.9])
    losses = {
        c: pinball_loss(torch.full((4000, 1, 1), c), y, q, torch.ones(1)).item()
        for c in (0.0, 1.2816, 2.5)
    }
    assert losses[1.2816] < losses[0.0] and losses[1.2816] < losses[2.5]


def test_conformal_calibration_reaches_nominal_coverage():
    lay = layout()
    m = fitted("lstm", lay)
    past, future = raw_inputs(2000, 12, 6, seed=5)
    with torch.no_grad():
        center = m(past, future)[..., 1]
    rng = np.random.default_rng(0)
    target = center.numpy() + rng.normal(0, 40, center.shape)  # wider than the untrained spread
    info = conformal_calibrate(m, past.numpy(), future.numpy(), target)
    assert info["coverage_before"] < 0.8
    assert 0.86 <= info["coverage_after"] <= 0.94
    pred = predict_numpy(m, past.numpy(), future.numpy())
    assert (np.diff(pred, axis=-1) >= 0).all()
    # the median is untouched by calibration
    assert np.allclose(pred[..., 1], center.numpy(), atol=1e-4)


def test_config_defaults_yaml_and_errors(tmp_path):
    cfg = TrainConfig().validate()
    assert cfg.data.past_slots == 24 and cfg.data.horizon_slots == 12
    p = tmp_path / "c.yaml"
    p.write_text(
        "model: transformer\ntransformer: {d_model: 16, heads: 2}\ndata: {horizon_min: 30}\n"
    )
    c = load_config(p)
    assert c.model == "transformer" and c.transformer.d_model == 16 and c.data.horizon_slots == 6
    p.write_text("data: {horizon_min: 32}\n")
    with pytest.raises(ConfigError, match="multiple of the 5-minute slot"):
        load_config(p)
    p.write_text("trainer: {max_epoch: 3}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(p)
    p.write_text("trainer: {lr: fast}\n")
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(p)
    with pytest.raises(ConfigError, match="test_subjects"):
        TrainConfig.from_dict({"data": {"split": "subjects"}})
    with pytest.raises(ConfigError, match="include 0.5"):
        TrainConfig.from_dict({"head": {"quantiles": [0.1, 0.9]}})


def test_gain_is_isf_like_and_scales_with_insulin_needs():
    """k = isf · g · (ref / ū)^β · s[lag]: halving the past basal doubles the gain (β = 1 at
    the start), and k is Toeplitz in the lag and zero for future slots."""
    m = fitted("lstm", layout())
    past, future = raw_inputs(4, 12, 6, seed=7)
    with torch.no_grad():
        k1 = m.parts(past, future)["k"]
        less = past.clone()
        less[..., PAST.index("basal_u")] *= 0.5
        k2 = m.parts(less, future)["k"]
    assert torch.allclose(k2, 2 * k1, rtol=1e-4)
    assert torch.allclose(k1[:, 5, 2], k1[:, 4, 1]) and (k1[:, 1, 3] == 0).all()


def test_announced_carbs_never_lower_the_forecast():
    m = fitted("lstm", layout())
    past, future = raw_inputs(16, 12, 6, seed=8)
    more = future.clone()
    more[:, 2, FUTURE.index("carbs_g")] += 40.0
    with torch.no_grad():
        assert (m(past, more) >= m(past, future) - 1e-4).all()


def test_expected_plan_head_learns_only_from_its_own_loss():
    """The plan expectation centres u but is detached from the forecast: the forecast loss
    gives its weights no gradient, its own loss does."""
    m = fitted("lstm", layout())
    past, future = raw_inputs(32, 12, 6, seed=9)
    target = past[:, -1:, 0].expand(32, 6)
    pred, aux = m.forward_train(past, future)
    pinball_loss(pred, target, torch.tensor([0.05, 0.5, 0.95]), m.delta_scale).backward()
    assert m.plan.weight.grad is None or (m.plan.weight.grad == 0).all()
    assert m.backbone.encoder.weight_ih_l0.grad.abs().sum() > 0
    m.zero_grad()
    _, aux = m.forward_train(past, future)
    aux.backward()
    assert m.plan.weight.grad.abs().sum() > 0
    assert (
        m.backbone.encoder.weight_ih_l0.grad is None
        or (m.backbone.encoder.weight_ih_l0.grad == 0).all()
    )


def test_linear_skip_starts_at_the_ridge_fit_and_sees_only_the_past():
    """fit_normalisation sets the skip by ridge: on windows whose glucose change is a linear
    function of the last differences, the untrained model's median change already follows
    it. The skip reads only the past, so the planned insulin cannot reach it."""
    lay = layout()
    torch.manual_seed(0)
    m = build_model("lstm", lay, {}, {}).eval()
    past, future = raw_inputs(2000, 12, 6, seed=11)
    g = past[..., 0]
    slope = g[:, -1] - g[:, -2]  # [B] mg/dL per slot
    target = g[:, -1:] + slope[:, None] * torch.arange(1, 7.0)  # [B, H] linear extrapolation
    m.fit_normalisation(past.numpy(), future.numpy(), target.numpy())
    future[..., FUTURE.index("carbs_g")] = 0.0  # free = backbone + skip only
    with torch.no_grad():
        free = m.parts(past, future)["free"]
    change = target - g[:, -1:]
    resid = (free - change).pow(2).mean().sqrt()
    assert resid < 0.05 * change.pow(2).mean().sqrt(), "the skip did not reach the ridge fit"
    assert m.skip.in_features == len(PAST) + 11  # L − 1 = 11 lags at L = 12


def test_specs_without_skip_lags_rebuild_without_a_skip():
    """Models saved before the skip existed keep their architecture (their state dicts load)."""
    from training.models import model_from_spec, model_spec

    old = model_spec("lstm", layout(), {"hidden": 8}, {}, 5)
    assert model_from_spec(old).skip is None
    new = model_spec("lstm", layout(), {"hidden": 8, "skip_lags": 4}, {}, 5)
    assert model_from_spec(new).skip.in_features == len(PAST) + 4


def test_transformer_patches_keep_the_contract():
    """Past patches change the tokens, not the contract: same output shape, ordered
    quantiles, insulin monotone; a patch that does not divide the past is refused."""
    lay = layout(L=12, H=6)
    torch.manual_seed(0)
    m = build_model("transformer", lay, {"patch": 3}, {}).eval()
    past, future = raw_inputs(64, 12, 6, seed=4)
    m.fit_normalisation(
        past.numpy(), future.numpy(), (past[:, -1:, 0] + 0 * future[..., 0]).numpy()
    )
    more = future.clone()
    more[:, 1, FUTURE.index("bolus_u")] += 2.0
    with torch.no_grad():
        y, y_more = m(past, future), m(past, more)
    assert y.shape == (64, 6, 3) and (torch.diff(y, dim=-1) >= 0).all()
    assert (y_more <= y + 1e-4).all()
    assert m.backbone.pos.shape[0] == 12 // 3 + 6
    with pytest.raises(ValueError, match="must divide"):
        build_model("transformer", lay, {"patch": 5}, {})
