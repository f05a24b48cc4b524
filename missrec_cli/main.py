"""The ``missrec`` console script: the model commands (:mod:`missrec_cli.model`), the data commands
(:mod:`missrec_cli.data`), the serving commands (:mod:`missrec_cli.serving`, :mod:`missrec_cli.quickstart`) and the
lifecycle commands (:mod:`missrec_cli.lifecycle`), each module importing what its commands need only when they run."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from missrec_cli import data, experiment, lifecycle, model, quickstart, serving

app = typer.Typer(
    help="MISSRec: train, evaluate, export and serve multi-modal sequential recommenders.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="Logging level.")] = "WARNING") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


model.register(app)
data.register(app)
serving.register(app)
quickstart.register(app)
lifecycle.register(app)
experiment.register(app)

__all__ = ["app"]

if __name__ == "__main__":
    app()
