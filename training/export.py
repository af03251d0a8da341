"""ONNX export under the model contract (`forecast.contract`), the parity check, the manifest.

A model directory holds exactly two files:

- ``model.onnx`` — one self-contained file (no ``.onnx.data``), opset 18. Inputs in raw units:
  ``past`` float32 ``[B, L, F_past]`` and ``future`` float32 ``[B, H, F_future]``; output
  ``glucose`` float32 ``[B, H, Q]`` mg/dL. The batch axis is dynamic. Normalisation, the
  monotone insulin head and the conformal offsets are inside the graph.
- ``manifest.json`` — what a consumer needs to build inputs and to trust the file
  (its schema, reader and the one loader, `OnnxForecaster`, live in `forecast.contract`)::

    format                "glucast-forecaster/1"
    model                 "lstm" | "transformer"
    onnx_file, sha256     the graph file and its sha256 (verified on load)
    inputs / output       names, shapes (B symbolic), dtypes, units
    past_features         names in order (== forecast.windows PAST_FEATURES by default)
    future_features       names in order
    past_slots (L), horizon_slots (H), slot_minutes, horizons_min, quantiles
    window_config         forecast.windows.WindowConfig.to_dict() — rebuild inputs with it
    split                 how the frame was split (so `evaluate` finds the same test split)
    training_data_hash    forecast.schema.dataset_hash of the training split frame
    test_dataset_hash     dataset_hash of the test split frame (comparisons need equality)
    mlflow_run_id, validation_metrics, calibration, parity_max_abs_mgdl
    monotone_in_planned_insulin  true: no quantile rises when basal_u/bolus_u rise
    glucast_version, opset, created_utc

Exporter choice: the TorchScript exporter (``dynamo=False``) is the default. Both exporters
give graphs that agree with torch to ~1e-4 mg/dL, but for the LSTM the TorchScript exporter
emits ONNX's native ``LSTM`` operator (one fused kernel in onnxruntime) while torch 2.13's
dynamo exporter unrolls the recurrence into hundreds of small ops, warns about the LSTM's
flat weights, and takes 10–60 s per export on a shared 2-core machine against ~0.2 s.
``exporter="dynamo"`` (config ``export.exporter``) remains available and tested, for the day
the TorchScript path is removed from torch.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np

# the contract lives in forecast.contract; these names are what training code imports
from forecast.contract import MODEL_FILE as ONNX_FILE
from forecast.contract import (  # noqa: F401 - re-exported for training code and tests
    ManifestError,
    ModelIntegrityError,
    ModelMissingError,
    OnnxForecaster,
    manifest_dict,
    write_manifest,
)
from forecast.contract import file_sha256 as sha256_file
from forecast.schema import GlucastError

OPSET = 18


class ExportError(GlucastError, RuntimeError):
    """The ONNX export failed or the exported graph disagrees with the torch model."""


def glucast_version() -> str:
    try:
        from importlib.metadata import version

        return version("glucast")
    except Exception:  # noqa: BLE001 - an uninstalled checkout still exports
        return "0+unknown"


# --------------------------------------------------------------------------- export


def export_onnx(
    model: Any,
    path: str | Path,
    past: np.ndarray,
    future: np.ndarray,
    exporter: str = "torchscript",
) -> Path:
    """Write `model` (a ForecastHead, eval mode) to one ONNX file at `path`."""
    import warnings

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    p = torch.from_numpy(np.ascontiguousarray(past[:2], dtype=np.float32))
    f = torch.from_numpy(np.ascontiguousarray(future[:2], dtype=np.float32))
    kwargs: dict[str, Any] = dict(
        input_names=["past", "future"], output_names=["glucose"], opset_version=OPSET
    )
    try:
        with warnings.catch_warnings():
            # Exporter chatter (deprecations, LSTM flat weights) is not the user's business.
            warnings.simplefilter("ignore")
            _export(torch, model, (p, f), path, exporter, kwargs)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many types
        raise ExportError(
            f"ONNX export ({exporter}) failed: {e}. Try the other exporter "
            "(config export.exporter: dynamo | torchscript)"
        ) from e
    stray = path.with_name(path.name + ".data")
    if stray.exists():  # one file is the contract; never leave weights outside it
        stray.unlink()
        raise ExportError(f"the exporter wrote external data beside {path}; expected one file")
    _rename_batch_axis(path)
    return path


def _export(torch: Any, model: Any, args: tuple, path: Path, exporter: str, kwargs: dict) -> None:
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch}, {0: batch}),
            verbose=False,
            **kwargs,
        )
    elif exporter == "torchscript":
        axes = {"past": {0: "batch"}, "future": {0: "batch"}, "glucose": {0: "batch"}}
        torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes, **kwargs)
    else:
        raise ExportError(f"unknown exporter {exporter!r}; use 'torchscript' or 'dynamo'")


def _rename_batch_axis(path: Path) -> None:
    """Name the dynamic axis 'batch' in every input/output (dynamo calls it s0, s1...)."""
    import onnx

    m = onnx.load(str(path))
    changed = False
    for vi in list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim[0]
        if d.dim_param != "batch":
            d.dim_param = "batch"
            changed = True
    if changed:
        onnx.save_model(m, str(path), save_as_external_data=False)


def onnx_session(path: str | Path, threads: int = 1):
    """A bare onnxruntime session on an export (the parity check, before a manifest exists)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    from forecast.contract import session_options

    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def check_parity(
    model: Any, onnx_path: str | Path, past: np.ndarray, future: np.ndarray, tol: float = 1e-3
) -> float:
    """Max |torch − onnxruntime| in mg/dL over the given windows; ExportError above `tol`."""
    from training.calibration import predict_numpy

    want = predict_numpy(model, past, future)
    sess = onnx_session(onnx_path)
    got = np.concatenate(
        [
            sess.run(
                ["glucose"],
                {
                    "past": np.ascontiguousarray(past[i : i + 1024], dtype=np.float32),
                    "future": np.ascontiguousarray(future[i : i + 1024], dtype=np.float32),
                },
            )[0]
            for i in range(0, len(past), 1024)
        ]
    )
    diff = float(np.max(np.abs(got - want))) if len(want) else 0.0
    if not diff <= tol:
        raise ExportError(
            f"ONNX and torch disagree by {diff:.3g} mg/dL on {len(past)} windows "
            f"(tolerance {tol:g}); the export is not faithful"
        )
    return diff


def export_model_dir(
    model: Any,
    out_dir: str | Path,
    *,
    kind: str,
    window_config: Any,
    past: np.ndarray,
    future: np.ndarray,
    info: dict[str, Any],
    exporter: str = "torchscript",
    tol: float = 1e-3,
) -> Path:
    """Export, check parity on real windows (`past`, `future`), write the manifest.

    `info` adds the manifest fields only the caller knows: split, training_data_hash,
    test_dataset_hash, mlflow_run_id, validation_metrics, calibration.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, out / ONNX_FILE, past, future, exporter=exporter)
    diff = check_parity(model, onnx_path, past, future, tol=tol)
    lay = model.layout
    if tuple(lay.past_features) != tuple(window_config.past_features) or tuple(
        lay.future_features
    ) != tuple(window_config.future_features):
        raise ExportError("the model's feature layout differs from the window it was trained on")
    manifest = manifest_dict(
        kind=kind,
        sha256=sha256_file(onnx_path),
        window=window_config,
        quantiles=tuple(lay.quantiles),
        model_file=ONNX_FILE,
        monotone_in_planned_insulin=True,
        parity_max_abs_mgdl=diff,
        parity_windows=int(len(past)),
        opset=OPSET,
        exporter=exporter,
        glucast_version=glucast_version(),
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    manifest.update(info)
    write_manifest(out, manifest)
    return out
