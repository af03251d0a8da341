"""The simulator's typed errors and warnings: bad input fails loudly, bad physiology is flagged."""

from __future__ import annotations

from forecast.schema import GlucastError


class SimInputError(GlucastError, ValueError):
    """An input the simulator cannot honour (negative insulin, NaN carbs, wrong shape...)."""


class UnknownPatientError(SimInputError, KeyError):
    """A patient name or group that is not among the 30 UVA/Padova virtual patients."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ScenarioError(SimInputError):
    """A meal scenario that does not fit the run (a meal before the start or after the end)."""


class PhysiologyWarning(UserWarning):
    """A patient left the physiological range (BG < 10 or > 600 mg/dL); the cohort goes on."""
