"""Predicted-low quantile sweep: the same forecasts through each rule, and the choice of one."""

import json

import numpy as np
import pandas as pd
import pytest
from test_alert_eval import Extrapolate, synthetic_days

from forecast.windows import WindowConfig
from serving.alerts import AlertThresholds
from serving.insilico.alert_eval import AlertEvalError, evaluate_table, forecast_table
from serving.insilico.alert_sweep import (
    SWEEP_COLUMNS,
    check_quantiles,
    choose_quantile,
    sweep_quantiles,
)


class SpreadExtrapolate(Extrapolate):
    """Extrapolation as the median, ±40 mg/dL at the 0.05 / 0.95 quantiles."""

    def predict(self, past, future):
        med = super().predict(past, future)[..., 1]  # [B, H]
        return np.stack([med - 40.0, med, med + 40.0], axis=-1)  # [B, H, Q]


def sweep_of(quantiles, days=3):
    f = synthetic_days(days)
    table = forecast_table(f, SpreadExtrapolate(), config=WindowConfig())
    return f, table, sweep_quantiles(f, table, quantiles)


def test_each_row_is_the_single_rule_evaluation_on_the_same_forecasts():
    f, table, sweep = sweep_of([0.5, 0.05, 0.3])
    assert list(sweep.columns) == list(SWEEP_COLUMNS)
    assert sweep["rule"].tolist() == ["predicted_low"] * 3 + ["threshold_low"]
    assert sweep["quantile"].iloc[:3].tolist() == [0.05, 0.3, 0.5]  # sorted
    for _, row in sweep.iloc[:3].iterrows():
        one = evaluate_table(
            f, table, thresholds=AlertThresholds(predicted_low_quantile=row["quantile"])
        )
        expect = one["predicted_low"]
        assert (row.sensitivity, row.lead_min, row.false_per_day, row.false_alerts) == (
            expect["sensitivity"], expect["lead_min"], expect["false_per_day"],
            expect["false_alerts"],
        )  # fmt: skip
    thr = sweep.iloc[-1]
    assert np.isnan(thr["quantile"]) and (thr.sensitivity, thr.lead_min) == (1.0, 0.0)


def test_a_lower_quantile_alerts_more_and_can_alert_too_early():
    _, _, sweep = sweep_of([0.05, 0.5])
    low_q, median = sweep.iloc[0], sweep.iloc[1]
    # the median extrapolation reaches < 70 within 30 min at 120 mg/dL: 30 min before the
    # first reading below 70. 40 mg/dL lower, the 0.05 rule fires at the first drop (140),
    # 40 min before: too early to count (a false alert); its re-alert 20 min later warns.
    assert (median["lead_min"], low_q["lead_min"]) == (30.0, 20.0)
    assert low_q["sensitivity"] == median["sensitivity"] == 1.0
    # and the near misses (150 -> 80 and flat) keep the 0.05 rule alarming every 20 minutes
    assert (median["false_alerts"], low_q["false_alerts"]) == (6, 27)


def test_choose_quantile_takes_the_most_sensitive_rule_within_the_budget():
    sweep = pd.DataFrame(
        {
            "rule": ["predicted_low"] * 4 + ["threshold_low"],
            "quantile": [0.2, 0.3, 0.4, 0.5, np.nan],
            "sensitivity": [0.98, 0.95, 0.95, 0.80, 1.0],
            "lead_min": [20.0, 15.0, 10.0, 10.0, 0.0],
            "false_per_day": [3.0, 0.9, 0.6, 0.3, 0.1],
        }
    )
    assert choose_quantile(sweep, 1.0) == 0.3  # 0.95 either way: the longer lead wins
    assert choose_quantile(sweep, 5.0) == 0.2
    assert choose_quantile(sweep, 0.5) == 0.5
    assert choose_quantile(sweep, 0.2) is None  # the threshold alarm is not a quantile
    with pytest.raises(AlertEvalError, match=">= 0"):
        choose_quantile(sweep, -1.0)


@pytest.mark.parametrize("bad", [[], [0.0], [1.0], [0.3, 1.5], [float("nan")]])
def test_sweep_quantiles_must_lie_strictly_between_0_and_1(bad):
    with pytest.raises(AlertEvalError):
        check_quantiles(bad)


def test_a_sweep_needs_forecasts():
    with pytest.raises(AlertEvalError, match="needs forecasts"):
        sweep_quantiles(synthetic_days(1), None, [0.3])


def test_tradeoff_plot_has_a_panel_for_warned_lows_and_one_for_lead():
    from forecast.plots import PlotError, alert_tradeoff_plot

    _, _, sweep = sweep_of([0.05, 0.3, 0.5], days=1)
    fig = alert_tradeoff_plot(sweep, goal=(1.0, 0.9, 20.0))
    sens_ax, lead_ax = fig.axes
    assert "warned" in sens_ax.get_ylabel() and "lead" in lead_ax.get_ylabel()
    with pytest.raises(PlotError, match="sweep_quantiles"):
        alert_tradeoff_plot(sweep.drop(columns="lead_min"))


def test_cli_sweep_prints_rows_and_the_chosen_quantile(tmp_path, capsys):
    pytest.importorskip("forecast.baselines")
    from forecast.cli import main
    from forecast.schema import write_parquet

    path = write_parquet(synthetic_days(3), tmp_path / "syn.parquet")
    png = tmp_path / "tradeoff.png"
    rc = main(["alerts", "evaluate", "--model", "persistence", "--data", str(path), "--json",
               "--sweep", "0.3,0.5", "--max-false-per-day", "5", "--plot", str(png)])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["quantile"] for r in out["sweep"]] == [0.3, 0.5, None]
    assert out["sweep"][-1]["rule"] == "threshold_low"
    assert out["chosen_quantile"] in (0.3, 0.5) and out["max_false_per_day"] == 5.0
    assert png.stat().st_size > 1000


def test_cli_sweep_options_are_checked(tmp_path, capsys):
    from forecast.cli import main
    from forecast.schema import write_parquet

    path = write_parquet(synthetic_days(1), tmp_path / "syn.parquet")
    base = ["alerts", "evaluate", "--model", "persistence", "--data", str(path)]
    assert main([*base, "--plot", str(tmp_path / "x.png")]) == 2
    assert "need --sweep" in capsys.readouterr().err
    assert main([*base, "--sweep", "0.3,abc"]) == 2
    assert "separated by commas" in capsys.readouterr().err
    assert main([*base, "--sweep", "0.3", "--quantile", "0.4"]) == 2
    assert "not both" in capsys.readouterr().err
