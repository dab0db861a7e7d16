"""Option types shared by the `lasad-train` commands (no torch): bounded numbers, NaN and infinity
refused, choices read from the registries that define them."""

from __future__ import annotations

import math

import click


class RegistryChoice(click.Choice):
    """A `click.Choice` whose names come from a registry, read on first use (`load()` returns
    them), so declaring the option imports nothing; the registry stays the one list of names."""

    def __init__(self, load, case_sensitive: bool = True):
        self._load, self._names = load, None
        super().__init__((), case_sensitive)

    @property
    def choices(self):
        if self._names is None:
            self._names = tuple(self._load())
        return self._names

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns the (empty) list given above
        pass


class Finite(click.FloatRange):
    """A FloatRange that also refuses NaN and infinity (which pass its comparisons)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class Weights(click.ParamType):
    """Comma-separated positive finite numbers, e.g. "1,2" -> [1.0, 2.0]."""

    name = "W1,W2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            out = [float(v) for v in str(value).split(",")]
        except ValueError:
            out = None
        if not out or not all(math.isfinite(v) and v > 0 for v in out) or len(out) > 64:
            self.fail(f"{value!r} is not a comma-separated list of positive numbers, e.g. 1,1", param, ctx)
        return out


def lasad_presets():
    from lasad_engine.config import LASAD_PRESET_NAMES
    return LASAD_PRESET_NAMES


def vq_presets():
    from lasad_engine.tokenizer import VQ_PRESETS
    return sorted(VQ_PRESETS)


class ByteSize(click.ParamType):
    """A number of bytes: an integer, or a number with KiB, MiB or GiB (16MiB, 1.5GiB), within
    [low, high]."""

    name = "size"
    UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            n = value
        else:
            text = str(value).strip()
            number = text.rstrip("KMGiBkmgib ")
            unit = text[len(number):].strip().lower()
            try:
                n = float(number) * self.UNITS[unit]
            except (KeyError, ValueError):
                self.fail(f"{value!r} is not a size: give bytes, or a number with KiB, MiB or GiB (e.g. 16MiB)",
                          param, ctx)
            if not math.isfinite(n) or n != int(n):
                self.fail(f"{value!r} is not a whole number of bytes", param, ctx)
        n = int(n)
        if not self.low <= n <= self.high:
            self.fail(f"{value!r} is not in the range {self.low >> 10}KiB to {self.high >> 20}MiB", param, ctx)
        return n


SEED = click.IntRange(0, 2**32 - 1)
BATCH = click.IntRange(1, 1 << 20)
STEPS = click.IntRange(1, 10**12)
EVERY = click.IntRange(1, 10**12)
LIMIT = click.IntRange(1, 1 << 40)
POSITIVE = Finite(min=0, min_open=True)
NON_NEGATIVE = Finite(min=0)
BETA = Finite(0, 1, max_open=True)
LIMIT_OPTION = click.option("--limit", type=LIMIT, default=None, metavar="N",
                            help="Use N images only, spread evenly over the set (deterministic): a quick try.")

