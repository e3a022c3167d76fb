"""mmie command line: ``mmie <stage> ...``. Each stage's command lives in its own module."""

from __future__ import annotations

from typing import Annotated

import typer

from mmie import __version__

# Importing a command module attaches its command to ``app``.
from mmie.cli import (  # noqa: E402,F401  (imported for their side effect)
    comprehension,
    data_cmd,
    evaluate,
    gate,
    model_cmd,
    neurons,
    relearn,
    report,
    select_layers,
    sweep,
    train_sae,
    unlearn,
)
from mmie.cli.app import app
from mmie.cli.common import STATE
from mmie.core.distributed import world


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmie {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Debug logs and tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Multilingual machine unlearning with interpretability tools."""
    del version
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    STATE.verbose, STATE.quiet = verbose, quiet
    if not world().main:  # under torchrun / accelerate launch only rank 0 reports progress
        STATE.quiet = True
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar of every other rank
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    app()
