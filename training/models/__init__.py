"""Deep forecasters: a small backbone (lstm.py, transformer.py) inside the shared head
(common.py) that owns normalisation, the monotone insulin effect and the quantiles."""

from __future__ import annotations

from dataclasses import asdict

from training.models.common import ForecastHead, Layout
from training.models.lstm import LSTMBackbone, LSTMConfig
from training.models.transformer import TransformerBackbone, TransformerConfig

# Past features constant for a person over a window: the therapy profile and the daily dose.
STATIC_FEATURES = ("carb_ratio_g_per_u", "isf_mgdl_per_u", "tdd_u")

__all__ = ["ForecastHead", "Layout", "build_model", "model_spec"]


def build_model(kind: str, layout: Layout, options: dict, head: dict, slot_minutes: int = 5):
    """A ForecastHead with the named backbone.

    `options` are the backbone's hyperparameters (config section `lstm:` / `transformer:`),
    `head` the HeadConfig fields (quantiles, isf_prior, insulin curve).
    """
    fp, fk = len(layout.past_features), len(layout.known)
    options = dict(options)
    # The linear skip lives in the shared head but is configured per model (`lstm:` /
    # `transformer:` sections), so each backbone can be tuned with or without it.
    skip_lags = int(options.pop("skip_lags", 12))
    kinetics = bool(options.pop("kinetics", False))  # likewise the compartmental term
    options.pop("median_mse", None)  # a loss setting (training/module.py), not the model's
    if kind == "lstm":
        static = options.pop("static_state", False)
        idx = tuple(i for i, f in enumerate(layout.past_features) if f in STATIC_FEATURES)
        backbone = LSTMBackbone(
            LSTMConfig(
                past_features=fp, known_features=fk, static_idx=idx if static else (), **options
            )
        )
    elif kind == "transformer":
        backbone = TransformerBackbone(
            TransformerConfig(
                past_features=fp,
                known_features=fk,
                past_slots=layout.past_slots,
                horizon_slots=layout.horizon_slots,
                **options,
            )
        )
    else:
        raise ValueError(f"unknown deep model {kind!r}; use 'lstm' or 'transformer'")
    return ForecastHead(
        backbone,
        layout,
        backbone.d_model,
        slot_minutes=slot_minutes,
        isf_prior=head.get("isf_prior", 40.0),
        insulin_peak_min=head.get("insulin_peak_min", 75.0),
        insulin_dia_min=head.get("insulin_dia_min", 360.0),
        insulin_gain=head.get("insulin_gain", "lag"),
        csf_prior=head.get("csf_prior", 3.0),
        dose_scaling=head.get("dose_scaling", True),
        center=head.get("center", "expected"),
        gain_context=head.get("gain_context", False),
        dose_feature=head.get("dose_feature", "basal_u"),
        skip_lags=skip_lags,
        kinetics=kinetics,
    )


def model_spec(kind: str, layout: Layout, options: dict, head: dict, slot_minutes: int) -> dict:
    """Everything needed to rebuild the module from a checkpoint (JSON-able)."""
    return {
        "kind": kind,
        "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(layout).items()},
        "options": dict(options),
        "head": {k: list(v) if isinstance(v, tuple) else v for k, v in dict(head).items()},
        "slot_minutes": slot_minutes,
    }


def model_from_spec(spec: dict):
    lay = spec["layout"]
    layout = Layout(
        past_features=tuple(lay["past_features"]),
        future_features=tuple(lay["future_features"]),
        past_slots=int(lay["past_slots"]),
        horizon_slots=int(lay["horizon_slots"]),
        quantiles=tuple(float(q) for q in lay["quantiles"]),
        carb_head=bool(lay.get("carb_head", False)),
    )
    # A spec saved before the linear skip existed describes a model without one.
    options = {"skip_lags": 0, **spec["options"]}
    return build_model(spec["kind"], layout, options, spec["head"], spec["slot_minutes"])
