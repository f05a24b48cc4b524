"""The ``missrec`` console script: the model commands (missrec.cli) plus the serving commands (missrec_cli.serving)."""

from __future__ import annotations

from missrec.cli import app
from missrec_cli.serving import register

register(app)

__all__ = ["app"]

if __name__ == "__main__":
    app()
