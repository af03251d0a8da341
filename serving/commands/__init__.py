"""`glucast loop|trial|journal|faults|alerts|peers|arena`: one module per command, heavy imports inside."""

from forecast.commands._registry import register_modules

COMMANDS = ["loop", "trial", "journal", "faults", "alerts", "peers", "arena"]


def register(sub) -> None:
    register_modules(sub, __name__, COMMANDS)
