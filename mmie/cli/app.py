"""The Typer application object; command modules in this package attach to it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mmie",
    help=(
        "Multilingual machine unlearning with interpretability tools: make a causal LM forget "
        "one language (Hindi by default), keep the others, and measure whether it worked."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect and validate text data before using it.", no_args_is_help=True)
model_app = typer.Typer(help="Inspect models mmie can load.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
