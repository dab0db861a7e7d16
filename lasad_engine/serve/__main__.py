"""`python -m lasad_engine.serve`: the `lasad-serve` command."""

from ..entry import lasad_serve

lasad_serve()
