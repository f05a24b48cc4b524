"""The ``missrec`` console script: the model commands (missrec.cli) plus the serving commands (missrec_cli.serving).

The model package's own app is left as it is (``python -m missrec.cli`` has the model commands only); this one
holds the same commands and callback, and the serving ones."""

from __future__ import annotations

import typer

from missrec.cli import app as model_app
from missrec_cli import lifecycle
from missrec_cli.serving import register

app = typer.Typer(
    help="MISSRec: train, evaluate, export and serve multi-modal sequential recommenders.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.registered_callback = model_app.registered_callback
app.registered_commands.extend(model_app.registered_commands)
register(app)
lifecycle.register(app)

__all__ = ["app"]

if __name__ == "__main__":
    app()
