"""Option types and parsers shared by several commands, declared once.

The model options (``--model``, ``--device``...) and the artifact options (``--out``,
``--force``, ``--json``) live in :mod:`mmie.cli.common`; this module holds the text-set options
and the parsers for repeated ``NAME=VALUE`` options, layer lists and shares.
"""

from __future__ import annotations

from typing import Annotated

import typer

FieldOpt = Annotated[str, typer.Option(help="JSON field or table column with the text.")]
MaxLengthOpt = Annotated[int, typer.Option(help="Tokens per text.")]
MaxSamplesOpt = Annotated[int | None, typer.Option(help="At most this many texts per set.")]
BatchSizeOpt = Annotated[int, typer.Option(help="Texts per forward pass.")]
LayersOpt = Annotated[str | None, typer.Option(help="Blocks, e.g. '0,3,8-12' (default: all).")]


def parse_pairs(items: list[str] | None, option: str,
                form: str = "NAME=VALUE") -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` pairs from a repeated option; ``form`` names the shape in the error."""
    pairs = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise typer.BadParameter(f"'{item}' is not {form}", param_hint=option)
        pairs.append((name.strip(), value.strip()))
    return tuple(pairs)


def parse_layers(text: str | None, option: str = "--layers") -> tuple[int, ...] | None:
    """'0,3,8-12' -> (0, 3, 8, 9, 10, 11, 12); None stays None."""
    if text is None:
        return None
    layers = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a list like 0,3,8-12",
                                 param_hint=option) from None
    return tuple(layers)


def parse_share(text: str, option: str = "--top") -> float:
    """'3%' or '0.03' -> 0.03."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a share like 3% or 0.03",
                                 param_hint=option) from None
    if not 0 < value <= 1:
        raise typer.BadParameter(f"'{text}' is not in (0, 100%]", param_hint=option)
    return value
