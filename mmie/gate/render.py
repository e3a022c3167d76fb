"""Rendering of a gate report: gate.md (Markdown tables) and forest.png (effects with CIs)."""

from __future__ import annotations

import io

from mmie.core.plotting import fit_scale

PASS, FAIL, REPORT, NOT_INFORMATIVE = "PASS", "FAIL", "REPORT", "NOT INFORMATIVE"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def threshold_text(gate: dict) -> str:
    """'> 0.3', '< 1.1' or 'in [0.4, 0.6]' for a gate entry of gate.json."""
    t = gate["threshold"]
    if isinstance(t, (list, tuple)):
        return f"in [{t[0]:g}, {t[1]:g}]"
    return f"{'>' if gate['direction'] == 'greater' else '<'} {t:g}"


def _gate_row(g: dict) -> str:
    ci = g["ci"]
    cells = [g["arm"], g["gate"], _num(g["estimate"]),
             "-" if ci is None else f"[{ci['low']:.4g}, {ci['high']:.4g}]",
             threshold_text(g), "-" if g["n"] is None else str(g["n"]), _num(g["min_n"]),
             _num(g["p_raw"]), _num(g["q"]), f"**{g['decision']}**",
             g["reason"].replace("|", "/")]
    return "| " + " | ".join(cells) + " |"


def _arm_row(arm: str, v: dict) -> str:
    return (f"| {arm} | **{v['decision']}** | {', '.join(map(str, v['seeds']))} | "
            f"{v['passed']}/{v['n']} | {', '.join(v['failed']) or '-'} | "
            f"{', '.join(v['insufficient']) or '-'} | {', '.join(v['not_informative']) or '-'} |")


def markdown(report: dict) -> str:
    """gate.md: the rule, arm decisions, then one row per gate x arm."""
    s = report["settings"]
    lines = ["# mmie gate", "",
             f"alpha {s['alpha']}, {s['n_boot']} bootstrap resamples (BCa), seed {s['seed']}, "
             f"replacement language {s['replacement_lang']}.", "", report["rule"], "",
             "| Arm | Decision | Seeds | Decisive gates passed | Failed | Insufficient evidence "
             "| Not informative (not decisive) |", "|---|---|---|---|---|---|---|"]
    lines += [_arm_row(arm, v) for arm, v in report["arms"].items()]
    lines += ["", "| Arm | Gate | Estimate | Interval (1-2 alpha) | Threshold | n | min n | p | "
              "q (BH, this arm) | Decision | Reason |",
              "|---|---|---|---|---|---|---|---|---|---|---|", *map(_gate_row, report["gates"])]
    return "\n".join(lines) + "\n"


_COLORS = {PASS: "tab:green", FAIL: "tab:red", REPORT: "tab:gray",
           NOT_INFORMATIVE: "tab:gray"}


def _forest_panel(ax, rows: list[dict], arms: list[str]) -> None:
    for g in rows:
        y = arms.index(g["arm"])
        if g["estimate"] is None:
            ax.text(0.5, y, "not computable", transform=ax.get_yaxis_transform(),
                    ha="center", va="center", color=_COLORS[g["decision"]], fontsize=7)
            continue
        ci, est = g["ci"], g["estimate"]
        err = None if ci is None else [[max(est - ci["low"], 0)], [max(ci["high"] - est, 0)]]
        ax.errorbar(est, y, xerr=err, fmt="o", color=_COLORS[g["decision"]], capsize=3)
    threshold = rows[0]["threshold"]
    marks = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold]
    for t in marks:
        ax.axvline(t, linestyle="--", color="black", linewidth=0.8)
    if rows[0]["method"] != "proportion":  # rates live in [0, 1]: linear is their scale
        fit_scale(ax, marks + [v for g in rows for v in (g["estimate"], *(
            (g["ci"]["low"], g["ci"]["high"]) if g["ci"] else ()))], axis="x")
    ax.set_yticks(range(len(arms)), arms, fontsize=7)
    ax.set_ylim(len(arms) - 0.5, -0.5)
    ax.set_title(f"{rows[0]['gate']}  ({threshold_text(rows[0])})", loc="left", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def forest_png(report: dict) -> bytes:
    """forest.png: one panel per gate, one row per arm; green PASS, red FAIL, grey REPORT and
    NOT INFORMATIVE."""
    # Figure + Agg canvas directly, not pyplot: no global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    gates, arms = list(dict.fromkeys(g["gate"] for g in report["gates"])), list(report["arms"])
    panel = 0.55 + 0.25 * len(arms)
    height = 0.6 + len(gates) * panel
    fig = Figure(figsize=(7.5, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(gates), 1, squeeze=False)[:, 0]
    # Fixed margins sized from the longest arm name: a layout engine triples the render time.
    fig.subplots_adjust(left=min(0.45, 0.04 + 0.011 * max(map(len, arms))), right=0.97,
                        top=1 - 0.35 / height, bottom=0.3 / height, hspace=1.05 / panel)
    for ax, gate in zip(axes, gates, strict=True):
        _forest_panel(ax, [g for g in report["gates"] if g["gate"] == gate], arms)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
