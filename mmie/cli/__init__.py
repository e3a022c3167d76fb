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
    langgate,
    model_cmd,
    neurons,
    relearn,
    report,
    select_layers,
    steer,
    sweep,
    train_sae,
    unlearn,
)
from mmie.cli.app import app
from mmie.cli.common import STATE, console
from mmie.core.distributed import world


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmie {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Debug logs and tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Time each phase, print a table at the end and store it in the "
                          "artifact's metrics.profile (also MMIE_PROFILE=1).")] = False,
) -> None:
    """Multilingual machine unlearning with interpretability tools."""
    del version
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    STATE.verbose, STATE.quiet = verbose, quiet
    _runtime(ctx, profile)
    if not world().main:  # under torchrun / accelerate launch only rank 0 reports progress
        STATE.quiet = True
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar of every other rank
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _runtime(ctx: typer.Context, profile: bool) -> None:
    """Threads that fit the machine (:mod:`mmie.core.threads`), freed memory reused for the
    next large tensor (:mod:`mmie.core.memory`), and the profile table printed when the command
    ends (:mod:`mmie.core.profile`)."""
    from mmie.core import memory, threads
    from mmie.core import profile as timing

    memory.keep_freed_memory()

    try:
        threads.configure()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if profile:
        timing.enable()
    if timing.enabled() and world().main:
        ctx.call_on_close(_print_profile)


def _print_profile() -> None:
    from mmie.core import profile as timing

    if (table := timing.snapshot()) is not None:
        console.print("[bold]profile[/] (phases nest: a parent's time includes its children)")
        console.print(timing.render(table), markup=False)


def main() -> None:
    app()
