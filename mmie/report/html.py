"""HTML and figure helpers shared by the report's sections (escaping, tables, inlined images)."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Sequence

from mmie.core.artifacts import Artifact
from mmie.core.plotting import fit_scale  # noqa: F401  (re-exported for the sections)

# Control characters from a broken generation would make the page invalid HTML.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Raw(str):
    """A table cell that is already HTML (a decision badge), inserted unescaped."""


def esc(value: object) -> str:
    return html.escape(_CONTROL.sub("\ufffd", str(value)))


def fmt(value: object) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict) and "value" in value:
        shown = fmt(value["value"]) if value["value"] is not None else "missing"
        return shown + (f" ({value['missing']})" if value.get("missing") else "")
    return str(value)


def cell(value: object) -> str:
    return value if isinstance(value, Raw) else esc(fmt(value))


def table(header: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def badge(decision: str) -> Raw:
    """A decision in words with its colour class (PASS, FAIL, PROCEED, STOP, ...)."""
    slug = decision.lower().replace(" ", "-")
    return Raw(f'<span class="d d-{esc(slug)}">{esc(decision)}</span>')


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def artifact_png(art: Artifact, name: str) -> str:
    path = art.path / name
    return img_tag(path.read_bytes(), f"{art.kind} {name}") if path.is_file() else ""


def figure_png(draw: Callable) -> bytes:
    """``draw(Figure class) -> Figure``, rendered with the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = draw(Figure)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def arm_label(art: Artifact) -> str:
    cfg = art.config
    return f"{cfg.get('arm', art.path.name)} / seed {cfg.get('seed', '-')}"


LANG_NAMES = {"hi": "Hindi", "en": "English", "ur": "Urdu", "pa": "Punjabi", "bn": "Bengali",
              "mr": "Marathi", "ne": "Nepali", "gu": "Gujarati", "ta": "Tamil", "te": "Telugu"}


def lang_name(code: str) -> str:
    return LANG_NAMES.get(code, code)
