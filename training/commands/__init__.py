"""`glucast train|finetune|evaluate|compare`: one module per command, heavy imports inside."""

from forecast.commands._registry import register_modules

COMMANDS = ["train", "evaluate", "compare", "benchmark"]


def register(sub) -> None:
    register_modules(sub, __name__, COMMANDS)
