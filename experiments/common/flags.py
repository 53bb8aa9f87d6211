"""argparse ``type`` helpers: every command-line flag's value is checked when the command line is
parsed (type, range, finiteness), so a bad value stops a command before it starts anything, with
argparse's usage line and the rule the value broke. Every experiment command uses these; none
checks a flag's value on its own.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--grace", type=number(minimum=0), default=60.0)
>>> p.parse_args(["--grace", "2.5"]).grace
2.5
>>> number(minimum=0)("nan")
Traceback (most recent call last):
argparse.ArgumentTypeError: 'nan': must be a finite number >= 0
>>> integer(1)("0")
Traceback (most recent call last):
argparse.ArgumentTypeError: '0': must be an integer >= 1
"""

import argparse
import math
from collections.abc import Callable
from typing import Any


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[minimum, maximum]`` (no upper bound when None)."""
    rule = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer {rule}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text!r}: must be an integer {rule}")
        return value

    return parse


def number(minimum: float | None = None, *, above: float | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number ``>= minimum`` (or ``> above``)."""
    rule = "".join([f" >= {minimum:g}" if minimum is not None else "", f" > {above:g}" if above is not None else ""])

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (minimum is None or value >= minimum) and (above is None or value > above)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number{rule}")
        return value

    return parse


def parsed_by(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` (which raises ValueError naming what is wrong) as an argparse ``type``."""

    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return checked
