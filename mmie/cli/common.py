"""Shared pieces of the CLI: global flags, option types, error mapping, rich progress."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichProgress,
)

from mmie.core.errors import MmieError
from mmie.core.progress import Progress, Task

T = TypeVar("T")


@dataclass
class State:
    verbose: bool = False
    quiet: bool = False


STATE = State()
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def info(message: str) -> None:
    """A status line on stderr, hidden by ``--quiet``."""
    if not STATE.quiet:
        console.print(message)


def emit_json(payload: Any) -> None:
    """Machine-readable output on stdout (``--json``)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line cause and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def run_guarded(fn: Callable[[], T]) -> T:
    """Run a command body; user errors become one line and exit 1 (2 for bad settings).

    ``ValueError`` comes from config validation (``__post_init__``), so it is a usage error.
    Anything else is a bug: it keeps its traceback, shown in full under ``-v``.
    """
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail("interrupted; no partial artifact was written", 130) from None
    except (MmieError, FileNotFoundError, PermissionError) as exc:
        if STATE.verbose:
            traceback.print_exc()
        raise fail(str(exc), 1) from None
    except ValueError as exc:
        if STATE.verbose:
            traceback.print_exc()
        raise fail(f"invalid setting: {exc}", 2) from None
    except Exception as exc:  # noqa: BLE001 - last resort: report, never swallow
        if STATE.verbose:
            traceback.print_exc()
        raise fail(f"{type(exc).__name__}: {exc} (run with -v for the traceback)", 1) from None


class _RichTask(Task):
    def __init__(self, bar: RichProgress, task_id: int) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: int = 1, **fields: object) -> None:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in fields.items())
        self._bar.update(self._id, advance=n, status=shown)

    def log(self, message: str) -> None:
        self._bar.console.print(message)


class RichProgressReporter(Progress):
    """Rich progress bars on stderr; silent under ``--quiet``."""

    def _bar(self) -> RichProgress:
        return RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=console, disable=STATE.quiet, transient=False,
        )

    def track(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        with self.task(desc, total) as task:
            for item in items:
                yield item
                task.advance()

    @contextmanager
    def task(self, desc: str, total: int | None = None) -> Iterator[Task]:
        with self._bar() as bar:
            yield _RichTask(bar, bar.add_task(desc, total=total, status=""))


def progress() -> Progress:
    return RichProgressReporter()


# Option types shared by commands, so every stage spells them the same way.
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="Model: 'default' (embedded Gemma 3 270M), a local HF folder, a .gguf file, a hub id, "
         "or tiny:llama / tiny:qwen2 / tiny:gemma3 (random weights, for smoke tests).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceMapOpt = Annotated[str | None, typer.Option(
    "--device-map", help="auto, balanced, balanced_low_0 or sequential: split a large model "
                         "over the available devices (blocks that do not fit are offloaded).")]


def _check_max_memory(value: str | None) -> str | None:
    from mmie.core.models import parse_max_memory

    if value is not None:
        try:
            parse_max_memory(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", callback=_check_max_memory,
    help="Memory cap per device for --device-map, e.g. 0=2GiB,cpu=20GiB (GPU index, cpu, "
         "disk or mps = size).")]
BlocksPathOpt = Annotated[str | None, typer.Option(
    "--blocks-path", help="Dotted path of the decoder-block list, for unknown architectures.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing artifact at --out.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]


def writes(config: T, out: Path, force: bool = False, resume: bool = False,
           main: bool | None = None) -> T:
    """``config``, once ``--out`` passed every check that needs no work (it is not, does not
    contain and is not inside any path the config names; :func:`mmie.core.provenance.check_out`)."""
    from mmie.core.provenance import check_out, config_inputs

    check_out(out, config_inputs(config), force=force, resume=resume, main=main)
    return config


def model_spec(model: str, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None, blocks_path: str | None = None,
               max_memory: str | None = None):
    """A :class:`mmie.core.models.ModelSpec` from the shared options (ValueError if invalid)."""
    from mmie.core.models import ModelSpec, parse_max_memory

    limits = parse_max_memory(max_memory) if max_memory is not None else None
    return ModelSpec(name=model, device=device, dtype=dtype, device_map=device_map,
                     max_memory=limits, blocks_path=blocks_path)
