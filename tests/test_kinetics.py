"""The person-aware parts of the deep forecasters: the compartmental term of the head
(training/models/kinetics.py) — its kernels follow forecast/insulin.py's curves, past insulin
lowers and past carbs raise the forecast, the person's ISF scales the plan gain — and the
LSTM's initial state from the static inputs (lstm.static_state); the forecast stays monotone
in the plan and the exported graph matches torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from forecast.insulin import InsulinCurve  # noqa: E402
from training.models import Layout, build_model  # noqa: E402
from training.models.kinetics import past_kernel  # noqa: E402

torch.set_num_threads(1)

PAST = ("glucose", "observed", "basal_u", "bolus_u", "carbs_g", "iob_u", "cob_g",
        "tod_sin", "tod_cos", "tdd_u", "carb_ratio_g_per_u", "isf_mgdl_per_u")  # fmt: skip
FUTURE = ("basal_u", "bolus_u", "carbs_g", "tod_sin", "tod_cos")
L, H = 24, 12


def raw_inputs(B: int, seed: int = 0, isf: float = 50.0, cr: float = 10.0):
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
    past[..., 9] = 40.0
    past[..., 10], past[..., 11] = cr, isf
    future = torch.zeros(B, H, len(FUTURE))
    future[..., 0] = 0.1
    future[..., 1] = (torch.rand(B, H, generator=g) < 0.05) * 2.0
    future[..., 2] = (torch.rand(B, H, generator=g) < 0.05) * 30.0
    future[..., 3], future[..., 4] = torch.sin(ang), torch.cos(ang)
    return past, future


def fitted(seed: int = 0, static_state: bool = True):
    torch.manual_seed(seed)
    lay = Layout(PAST, FUTURE, L, H, (0.05, 0.5, 0.95), carb_head=True)
    opts = {"hidden": 16, "kinetics": True, "static_state": static_state}
    m = build_model("lstm", lay, opts, {}).eval()
    past, future = raw_inputs(256, seed, isf=float(30 + 40 * (seed % 2)))
    past[128:, :, 11] = 80.0  # two people: the reference ISF is their mean
    target = past[:, -1:, 0] + 10 * torch.randn(256, H)
    m.fit_normalisation(past.numpy(), future.numpy(), target.numpy())
    return m


MODEL = fitted(1)


def test_past_kernel_is_the_curve_between_origin_and_target():
    curve = InsulinCurve(75.0, 360.0)
    t = np.arange(L + H + 2) * 5.0
    acted = 1 - curve.iob_fraction(t)
    k = past_kernel(acted, L, H)  # [H, L]
    assert k.shape == (H, L) and (k >= 0).all()
    # a dose in the origin's slot has acted 1 slot at the origin, h + 2 at target h
    assert np.allclose(k[:, -1], acted[np.arange(H) + 2] - acted[1])
    # a dose's remaining effect grows with the horizon, and older doses have less left
    assert (np.diff(k, axis=0) >= -1e-7).all()
    assert k[-1, 0] < k[-1, -1]


def test_past_insulin_lowers_and_past_carbs_raise_the_compartmental_term():
    past, _ = raw_inputs(8, seed=2)
    ctx = torch.zeros(8, MODEL.kinetics.cfg.d_model)
    with torch.no_grad():
        base = MODEL.kinetics(past, ctx)[0]
        more_ins, more_carb = past.clone(), past.clone()
        more_ins[:, -6, PAST.index("bolus_u")] += 2.0
        more_carb[:, -6, PAST.index("carbs_g")] += 30.0
        assert (MODEL.kinetics(more_ins, ctx)[0] < base).all()
        assert (MODEL.kinetics(more_carb, ctx)[0] > base).all()


def test_person_isf_scales_the_plan_gain():
    """k ∝ the profile's ISF: a person twice as sensitive gets twice the plan gain (the
    dose scaling reads tdd_u, which is the same here)."""
    past, future = raw_inputs(4, seed=5, isf=30.0)
    twice = past.clone()
    twice[..., PAST.index("isf_mgdl_per_u")] = 60.0
    with torch.no_grad():
        k1 = MODEL.parts(past, future)["k"]
        k2 = MODEL.parts(twice, future)["k"]
    assert torch.allclose(k2, 2 * k1, rtol=1e-4) and (k1 >= 0).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    slot=st.integers(0, H - 1),
    extra=st.floats(0.01, 20.0),
    which=st.sampled_from(["basal_u", "bolus_u"]),
    isf=st.floats(5.0, 600.0),
)
def test_more_planned_insulin_never_raises_any_quantile(seed, slot, extra, which, isf):
    past, future = raw_inputs(16, seed=seed, isf=isf)
    more = future.clone()
    more[:, slot, FUTURE.index(which)] += extra
    with torch.no_grad():
        base, after = MODEL(past, future), MODEL(past, more)
    assert (after <= base + 1e-4).all()
    assert (after[:, slot:, 1] < base[:, slot:, 1]).any()


def test_without_a_profile_the_priors_stand_in():
    lay = Layout(PAST[:-2], FUTURE, L, H, (0.05, 0.5, 0.95), carb_head=True)
    m = build_model("lstm", lay, {"hidden": 16, "kinetics": True}, {}).eval()
    past, future = raw_inputs(32, seed=3)
    past = past[..., :-2].contiguous()
    m.fit_normalisation(
        past.numpy(), future.numpy(), (past[:, -1:, 0] + 0 * future[..., 0]).numpy()
    )
    assert float(m.kinetics.isf_ref) == 40.0 and float(m.kinetics.csf_ref) == 3.0
    with torch.no_grad():
        assert torch.isfinite(m(past, future)).all()


def test_static_inputs_set_the_encoder_state():
    """With static_state the profile and daily dose at the origin seed the encoder: another
    person's profile changes the forecast even where the compartmental term cannot (no
    past insulin or carbs), and without it the encoder starts from zeros."""
    assert MODEL.backbone.static is not None
    idx = [PAST.index(f) for f in ("tdd_u", "carb_ratio_g_per_u", "isf_mgdl_per_u")]
    assert MODEL.backbone.static_idx.tolist() == idx
    assert fitted(1, static_state=False).backbone.static is None
    past, future = raw_inputs(4, seed=4)
    past[..., [2, 3, 4]] = 0.0  # no past insulin or carbs
    other = past.clone()
    other[..., PAST.index("carb_ratio_g_per_u")] = 25.0
    known = future[..., [FUTURE.index("tod_sin"), FUTURE.index("tod_cos")]]  # [B, H, 2]
    with torch.no_grad():
        ctx = MODEL.backbone(normalised(past), known)[1]  # [B, D]
        ctx_other = MODEL.backbone(normalised(other), known)[1]  # [B, D]
    assert not torch.allclose(ctx, ctx_other)


def normalised(past: torch.Tensor) -> torch.Tensor:
    return (past - MODEL.past_mean) / MODEL.past_std


def test_onnx_export_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from training.export import check_parity, export_onnx

    past, future = raw_inputs(64, seed=9)
    path = export_onnx(MODEL, tmp_path / "m.onnx", past.numpy(), future.numpy())
    assert check_parity(MODEL, path, past.numpy(), future.numpy()) <= 1e-3
