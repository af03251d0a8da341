"""Training configuration: one dataclass tree with the defaults, overridable from YAML.

The defaults are what `glucast train` uses without `--config`; they were tuned so that the
LSTM beats persistence and ridge on a 30-patient simulated cohort, trains in minutes on two
CPU cores and runs in well under a millisecond per forecast in onnxruntime.

A YAML file overrides any subset, e.g.::

    model: transformer
    data: {past_min: 120, horizon_min: 60, split: subjects, test_subjects: ["adult#001"]}
    transformer: {d_model: 48, layers: 2}
    trainer: {max_epochs: 30, lr: 0.002}

Unknown keys are an error (a typo would otherwise silently train the default).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forecast.schema import GlucastError

if TYPE_CHECKING:
    import pandas as pd

    from forecast.windows import WindowConfig

DEEP_MODELS = ("lstm", "transformer")
PROFILE_MODES = ("auto", "on", "off")
BASELINE_MODELS = ("persistence", "linear", "ridge", "physio")
ALL_MODELS = DEEP_MODELS + BASELINE_MODELS


class ConfigError(GlucastError, ValueError):
    """A training configuration value is unknown, of the wrong type or out of range."""


@dataclass
class DataConfig:
    """How windows are cut from the frame and how the frame is split."""

    past_min: int = 120  # L × slot: how much history the model sees
    horizon_min: int = 60  # H × slot: how far it forecasts (up to 120)
    slot_minutes: int = 5
    max_past_gap_slots: int = 6
    split: str = "chronological"  # or "subjects" (held-out subjects are the test set)
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test per subject
    test_subjects: tuple[str, ...] = ()  # for split = "subjects"
    stride: int = 1  # between training windows; evaluation always uses every window
    # The therapy profile (carb ratio, ISF: forecast.windows.PROFILE_FEATURES) as static
    # inputs: "auto" uses it when the frame has the columns (simulated cohorts do; most
    # recorded data sets do not), "on" requires it, "off" never uses it. On the demo cohort it
    # cut the LSTM's 30/60-min RMSE from 15.9/24.0 to 14.2/20.2 mg/dL (make demo).
    profile: str = "auto"

    def slots(self, minutes: int, what: str) -> int:
        if minutes <= 0 or minutes % self.slot_minutes:
            raise ConfigError(
                f"data.{what} = {minutes} min is not a positive multiple of the "
                f"{self.slot_minutes}-minute slot; use e.g. {max(1, minutes // self.slot_minutes) * self.slot_minutes}"
            )
        return minutes // self.slot_minutes

    @property
    def past_slots(self) -> int:
        return self.slots(self.past_min, "past_min")

    @property
    def horizon_slots(self) -> int:
        return self.slots(self.horizon_min, "horizon_min")


@dataclass
class LSTMOptions:
    hidden: int = 64
    layers: int = 1
    dropout: float = 0.0
    # Glucose differences fed to the head's linear skip (0 = no skip; training/models/common.py).
    skip_lags: int = 12
    # A compartmental term in the head (training/models/kinetics.py): the insulin and carbs
    # of the past window through kinetic curves with per-window weights read from the
    # history, scaled by the person's ISF (therapy profile), which scales the plan and carb
    # gains too. Configured per model like skip_lags. Off: on the demo cohort (seed 0, test
    # RMSE 30/60) 14.45/20.66 against 14.36/20.43 without; it does cut the interventional
    # error at 60 min (8.1 -> 7.1 %).
    kinetics: bool = False
    # The person's static inputs (therapy profile, daily dose) at the origin set the
    # encoder's initial state (training/models/lstm.py). Off: with kinetics and 36 epochs it
    # won on validation days (17.6 vs 18.6 at 60 min) but not on the later test days (seeds
    # 0/1: 14.38/19.88, 14.60/20.44 vs 14.17/19.66) and lost on AZT1D (18.41/31.05 vs
    # 17.77/29.48).
    static_state: bool = False
    # Weight of a squared-error term on the median (in delta_scale units) next to the pinball
    # loss: the pinball loss fits the median, RMSE scores the mean (training/module.py).
    median_mse: float = 0.0


@dataclass
class TransformerOptions:
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    ff_mult: int = 2
    dropout: float = 0.0
    skip_lags: int = 12  # as in LSTMOptions
    kinetics: bool = False  # as in LSTMOptions
    median_mse: float = 0.0  # as in LSTMOptions
    # Past slots per past token (must divide the past slots). 3 (one token per 15-min Libre
    # reading) helped on ShanghaiT1DM (mean of 2 seeds, 30/60 min: 13.60/26.54 -> 13.42/26.08)
    # but not on the 5-min simulated cohort (16.51/25.09 -> 16.78/25.41), so 1 by default.
    patch: int = 1


@dataclass
class HeadConfig:
    """The output head shared by the deep models (see training/models/common.py)."""

    quantiles: tuple[float, ...] = (0.05, 0.5, 0.95)
    # Prior insulin sensitivity (mg/dL per U) scaling the insulin-effect head; the model
    # learns a context-dependent factor around it. Only the starting point, not a constraint.
    isf_prior: float = 40.0
    insulin_gain: str = "lag"  # "lag": ISF-like gain × shared lag profile; "full": per (h, j)
    carb_head: bool = True  # announced future carbs through a structured, positive head
    csf_prior: float = 3.0  # mg/dL per g: the carb head's starting gain
    dose_scaling: bool = True  # gain × (reference dose / window's mean past dose)^β
    dose_feature: str = "tdd_u"  # the past feature whose window mean is the dose scale
    center: str = "expected"  # plan centring: "expected" (learned from the past) or "basal"
    # Let the ISF-like gain depend on the past context (beyond the dose scaling)? Off by
    # default: on the 30-patient excitation cohort a context-dependent gain shrank itself
    # (predicted 60-min response to +1 U: -0.6 to -1.3 mg/dL against a true -6.1).
    gain_context: bool = False


@dataclass
class TrainerConfig:
    # 36 epochs (early stopping usually ends near 23): at 12 the validation RMSE was still
    # falling steeply when the cosine schedule ended. Demo cohort (30 x 14 days, seed 0, test
    # RMSE 30/60 min): 14.36/20.43 -> 14.17/19.66; AZT1D (7 of 20 subjects, seed 0):
    # 17.90/30.03 -> 17.77/29.48 (benchmarks/forecast_ablation.py, issue 16).
    max_epochs: int = 36
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 6  # early stopping on validation loss
    gradient_clip: float = 1.0
    seed: int = 0
    threads: int = field(default_factory=lambda: int(os.environ.get("GLUCAST_TORCH_THREADS", "1")))
    max_train_windows: int = 32768  # windows per epoch, drawn at random (0 = one pass)
    freeze_insulin_epochs: int = 3  # hold the insulin head at its prior this many epochs
    # Simulator data only: this many counterfactual twins of training windows teach the
    # insulin-effect head (training/twins.py says why); 0 = learn it from the data alone.
    twins: int = 4096
    twin_weight: float = 1.0
    accelerator: str = "cpu"
    devices: str = "1"
    strategy: str = "auto"
    num_nodes: int = 1


@dataclass
class ExportConfig:
    exporter: str = "torchscript"  # or "dynamo" (see training/export.py for why)
    parity_tol_mgdl: float = 1e-3


@dataclass
class TrainConfig:
    model: str = "lstm"
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    lstm: LSTMOptions = field(default_factory=LSTMOptions)
    transformer: TransformerOptions = field(default_factory=TransformerOptions)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> TrainConfig:
        if self.model not in ALL_MODELS:
            raise ConfigError(f"model {self.model!r} is not one of {list(ALL_MODELS)}")
        d = self.data
        _ = d.past_slots, d.horizon_slots  # raise on non-multiples
        if d.horizon_slots > 24:
            raise ConfigError(f"data.horizon_min = {d.horizon_min} exceeds the 120-minute maximum")
        if d.split not in ("chronological", "subjects"):
            raise ConfigError(f"data.split {d.split!r} must be 'chronological' or 'subjects'")
        if d.split == "subjects" and not d.test_subjects:
            raise ConfigError("data.split = 'subjects' needs data.test_subjects (a list of ids)")
        if len(d.fractions) != 3 or abs(sum(d.fractions) - 1) > 1e-6 or min(d.fractions) <= 0:
            raise ConfigError(
                f"data.fractions {list(d.fractions)} must be three positive numbers summing to 1"
            )
        if d.stride < 1:
            raise ConfigError("data.stride must be >= 1")
        if d.profile not in PROFILE_MODES:
            raise ConfigError(f"data.profile {d.profile!r} must be one of {list(PROFILE_MODES)}")
        q = self.head.quantiles
        if 0.5 not in q or sorted(q) != list(q) or len(set(q)) != len(q):
            raise ConfigError(f"head.quantiles {list(q)} must be ascending, unique and include 0.5")
        if any(not 0 < x < 1 for x in q):
            raise ConfigError(f"head.quantiles {list(q)} must lie strictly between 0 and 1")
        t = self.trainer
        if t.max_epochs < 1 or t.batch_size < 1 or t.lr <= 0:
            raise ConfigError("trainer.max_epochs, batch_size and lr must be positive")
        if t.twins < 0 or t.twin_weight < 0:
            raise ConfigError("trainer.twins and trainer.twin_weight must be >= 0")
        if self.head.insulin_gain not in ("lag", "full"):
            raise ConfigError(f"head.insulin_gain {self.head.insulin_gain!r}: use lag or full")
        if self.head.center not in ("expected", "basal"):
            raise ConfigError(f"head.center {self.head.center!r}: use expected or basal")
        if self.export.exporter not in ("torchscript", "dynamo"):
            raise ConfigError(
                f"export.exporter {self.export.exporter!r}: use torchscript or dynamo"
            )
        if self.transformer.d_model % self.transformer.heads:
            raise ConfigError("transformer.d_model must be a multiple of transformer.heads")
        return self

    def window_config(self, frame: pd.DataFrame | None = None) -> WindowConfig:
        """The forecast.windows.WindowConfig these settings describe — for `frame`, whose
        columns decide whether the therapy profile is an input (`data.profile`)."""
        from forecast.windows import PAST_FEATURES, PROFILE_FEATURES, WindowConfig

        profile = self.uses_profile(frame)
        return WindowConfig(
            past_features=PAST_FEATURES + (PROFILE_FEATURES if profile else ()),
            past_slots=self.data.past_slots,
            horizon_slots=self.data.horizon_slots,
            slot_minutes=self.data.slot_minutes,
            max_past_gap_slots=self.data.max_past_gap_slots,
        )

    def uses_profile(self, frame: pd.DataFrame | None = None) -> bool:
        """Does a model trained on `frame` take the therapy profile as inputs?"""
        from forecast.windows import PROFILE_FEATURES

        mode = self.data.profile
        has = frame is not None and all(c in frame.columns for c in PROFILE_FEATURES)
        if mode == "on" and not has:
            raise ConfigError(
                f"data.profile = 'on' but the frame lacks the therapy-profile columns "
                f"{list(PROFILE_FEATURES)}; add them or set data.profile to auto or off"
            )
        return mode != "off" and has

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        return _build(cls, d or {}, "").validate()

    def override(self, d: dict[str, Any]) -> TrainConfig:
        """A copy with the (nested) keys of `d` replaced."""
        merged = _deep_merge(self.to_dict(), d)
        return TrainConfig.from_dict(merged)

    def flat(self) -> dict[str, Any]:
        """Dotted keys for MLflow params (`trainer.lr` ...)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else k, x)
            else:
                out[prefix] = v

        walk("", self.to_dict())
        return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then explicit overrides (from CLI flags)."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such config file: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    data = _deep_merge(data, overrides or {})
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e


# --------------------------------------------------------------------------- helpers


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls: type, d: Any, where: str) -> Any:
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in d.items():
        default = getattr(defaults, name)
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key)
        else:
            kwargs[name] = _coerce(value, default, key)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, tuple):
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise TypeError
            if default and isinstance(default[0], float):
                return tuple(float(x) for x in value)
            return tuple(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{key} = {value!r} has the wrong type; expected {type(default).__name__} "
            f"like {default!r}"
        ) from None
    return value
