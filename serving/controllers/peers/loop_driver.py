"""glucast's driver for Loop as pyloopkit (opsb-pyloopkit 0.1.0, BSD-2-Clause; Tidepool's
Python port of LoopKit), run by the peer venv's interpreter — never imported by glucast:

    <peers>/loop/venv/bin/python -I loop_driver.py

One JSON request per line on stdin, one JSON answer per line on stdout (same order). A
request is pyloopkit's own "previous run" dictionary (the JSON form its
`pyloop_parser.parse_dictionary_from_previous_run` reads: ISO datetimes, "HH:MM:SS" schedule
times, dose types by name); this file only converts those strings to the objects
`pyloopkit.loop_data_manager.update` takes and its answer back to JSON. Nothing of Loop is
re-implemented. `update` returns ``[]`` (with only a warning) when it finds the input
invalid: that is answered as an error, with the warnings it printed.
"""

import json
import sys
import warnings
from datetime import datetime, time

from pyloopkit.dose import DoseType
from pyloopkit.loop_data_manager import update

_TIMES = (
    "basal_rate_start_times",
    "carb_ratio_start_times",
    "sensitivity_ratio_start_times",
    "sensitivity_ratio_end_times",
    "target_range_start_times",
    "target_range_end_times",
)
_DATETIMES = ("dose_start_times", "dose_end_times", "glucose_dates", "carb_dates")


def _to_inputs(req):
    d = dict(req)
    d.pop("id", None)
    for k in _TIMES:
        d[k] = [time.fromisoformat(s) for s in d[k]]
    for k in _DATETIMES:
        d[k] = [datetime.fromisoformat(s) for s in d[k]]
    d["time_to_calculate_at"] = datetime.fromisoformat(d["time_to_calculate_at"])
    d["dose_types"] = [DoseType.from_str(s) for s in d["dose_types"]]
    last = d.get("last_temporary_basal") or []
    if last:
        last = [
            DoseType.from_str(last[0]),
            datetime.fromisoformat(last[1]),
            datetime.fromisoformat(last[2]),
            last[3],
        ]
    d["last_temporary_basal"] = last
    return d


def _json(x):
    if isinstance(x, datetime):
        return x.isoformat()
    if isinstance(x, DoseType):
        return x.name
    if hasattr(x, "name") and hasattr(x, "value"):  # other enums (Correction)
        return x.name
    if isinstance(x, (list, tuple)):
        return [_json(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return x


def decide(req):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = update(_to_inputs(req))
    if not out or not isinstance(out, dict):
        said = "; ".join(str(w.message) for w in caught) or "no warning given"
        raise ValueError(f"pyloopkit update() returned {out!r}: invalid input ({said})")
    return {
        "predicted_glucose_dates": _json(out["predicted_glucose_dates"]),
        "predicted_glucose_values": _json(out["predicted_glucose_values"]),
        "recommended_temp_basal": _json(out["recommended_temp_basal"]),
        "recommended_bolus": _json(out["recommended_bolus"]),
        "carbs_on_board": _json(out["carbs_on_board"]),
    }


def main():
    import importlib.metadata as md

    write = sys.stdout.write
    sys.stdout = sys.stderr  # pyloopkit prints: keep stdout for answers
    ready = {
        "ready": True,
        "peer": "loop",
        "version": md.version("opsb-pyloopkit"),
        "numpy": md.version("numpy"),
        "python": sys.version.split()[0],
    }
    write(json.dumps(ready) + "\n")
    sys.__stdout__.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            msg = {"id": rid, "ok": True, "result": decide(req)}
        except Exception as e:  # every failure is answered, the process lives on
            msg = {"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"}
        write(json.dumps(msg) + "\n")
        sys.__stdout__.flush()


if __name__ == "__main__":
    main()
