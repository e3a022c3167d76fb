"""The sweep's grid: a TOML file (or repeated ``--axis`` options) read into plain settings.

A grid file has four tables::

    [unlearn]      # settings every run shares (UnlearnConfig fields: forget, retain, steps...)
    [validation]   # the validation split and rule (ValidationConfig fields)
    [test]         # the test split (EvalConfig fields): read once, for the winner only
    [grid]         # the axes: method, objective, lr, rank, steps (lists); and
    [grid.objective_options]   # per objective, a list of option tables (objective weights)

The runs are the cartesian product of the axes; an objective's option tables multiply only
that objective's runs (``redirect`` weights mean nothing to ``npo``), and an objective with
none listed runs once with its defaults. An axis left out takes the shared setting (``lr``:
the method's default). ``[unlearn] alternative`` is given only to the runs whose objective
reads an alternative text (``redirect``, ``dpo``), and ``[unlearn] gate_probe`` (a langgate
artifact) only to ``glora`` runs. ``configs/sweep.toml`` is the default grid.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

AXES = ("method", "objective", "lr", "rank", "steps")  # scalar axes, in run-name order
_NUMERIC = {"lr": float, "rank": int, "steps": int}


@dataclass(frozen=True)
class Point:
    """One run of the grid: its name (a folder name) and the settings it overrides."""

    name: str
    overrides: dict

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides.items())


@dataclass(frozen=True)
class SweepConfig:
    """A grid and the settings it varies (module docstring)."""

    unlearn: dict
    validation: dict
    test: dict
    axes: tuple[tuple[str, tuple], ...] = ()
    objective_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("unlearn", "validation", "test"):
            if not getattr(self, name):
                raise ValueError(f"the grid file needs a '{name}' table")
        for key in ("forget", "retain"):
            for name in ("validation", "test"):
                if not getattr(self, name).get(key):
                    raise ValueError(f"the grid file's '{name}' table needs '{key}'")
        unknown = [a for a, _ in self.axes if a not in AXES]
        if unknown:
            raise ValueError(f"unknown grid axis {', '.join(unknown)} (axes: {', '.join(AXES)}, "
                             "and the grid.objective_options table)")
        if any(not values for _, values in self.axes):
            raise ValueError("every grid axis needs at least one value")
        if len(self.points()) < 1:
            raise ValueError("the grid has no runs")

    def points(self) -> list[Point]:
        """Every run, in a fixed order, named ``r01-lora-npo-lr0.001...``."""
        axes = dict(self.axes)
        names = [a for a in AXES if a in axes]
        out = []
        for values in itertools.product(*(axes[a] for a in names)):
            base = dict(zip(names, values, strict=True))
            objective = base.get("objective", self.unlearn.get("objective", "npo"))
            for options in self.objective_options.get(objective) or [{}]:
                overrides = dict(base)
                if options:
                    overrides["objective_options"] = {k: str(v) for k, v in options.items()}
                out.append(Point(_name(len(out) + 1, overrides), overrides))
        return out

    def to_dict(self) -> dict:
        return {"unlearn": self.unlearn, "validation": self.validation, "test": self.test,
                "axes": {a: list(v) for a, v in self.axes},
                "objective_options": self.objective_options}


def _name(number: int, overrides: dict) -> str:
    parts = [f"r{number:02d}"]
    for key, value in overrides.items():
        if key == "objective_options":
            parts += [f"{k}{v}" for k, v in value.items()]
        else:
            parts.append(f"{'' if key in ('method', 'objective') else key}{value}")
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", "-".join(parts))


def parse_axis(item: str) -> tuple[str, tuple]:
    """``NAME=V1,V2`` (an ``--axis`` option) -> (name, typed values)."""
    name, sep, values = item.partition("=")
    name = name.strip()
    if not sep or not values.strip():
        raise ValueError(f"'{item}' is not NAME=V1,V2")
    kind = _NUMERIC.get(name, str)
    try:
        return name, tuple(kind(v.strip()) for v in values.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--axis {name}: values must be {kind.__name__}s, got '{values}'") \
            from None


def load_grid(path: Path | str, axes: Sequence[str] = ()) -> SweepConfig:
    """Read a grid file; ``axes`` (``NAME=V1,V2``) replace the file's axes of that name."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the grid file ({exc})") from None
    grid = dict(data.get("grid", {}))
    options = grid.pop("objective_options", {})
    found = {k: tuple(v if isinstance(v, list) else [v]) for k, v in grid.items()}
    found |= dict(parse_axis(item) for item in axes)
    return SweepConfig(unlearn=data.get("unlearn", {}), validation=data.get("validation", {}),
                       test=data.get("test", {}), axes=tuple(found.items()),
                       objective_options=options)
