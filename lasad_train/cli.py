"""`lasad-train`: data, tokenizer, codes and GPT training stages (subcommands load lazily)."""

from __future__ import annotations

import importlib

import click

from lasad_engine import __version__
from lasad_engine.cli import OneLineErrors

STAGES = {
    "data": ("lasad_train.data", "data_cmd"),
    "tokenizer": ("lasad_train.tokenizer_train", "tokenizer_cmd"),
    "codes": ("lasad_train.codes", "codes_cmd"),
    "gpt": ("lasad_train.gpt", "gpt_cmd"),
}


class LazyGroup(OneLineErrors, click.Group):
    """Imports a stage only when it runs, so `lasad-train --help` stays fast; errors of every
    stage end as one line (the stages are OneLineCommand or groups of them)."""

    def list_commands(self, ctx):
        return list(STAGES)

    def get_command(self, ctx, name):
        if name not in STAGES:
            return None
        module, attr = STAGES[name]
        return getattr(importlib.import_module(module), attr)


@click.group("lasad-train", cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lasad-train")
def main():
    """Train LASADGen: build an image set, train the VQ tokenizer, extract codes, train the GPT."""


if __name__ == "__main__":
    main()
