"""`sweep`: train every run of a small grid, pick the winner on validation, test only it.

Contract ("the test set is read once"):

1. every grid point (:mod:`mmie.sweep.grid`) is trained with the validation split; its
   ``adapter`` artifact records the validation curve and the checkpoint the validation rule
   kept (:mod:`mmie.unlearn.validation`); the sweep reads only that record;
2. the winner (:func:`pick`): a run whose kept checkpoint met the rule beats any that did
   not; among those, the lowest validation forget-language mass; ties: the earlier run. When
   no run met the rule the lowest forget mass still wins and the table says none qualified;
3. only then are the test files opened: first to refuse any test text that is also a
   training or validation text (content hashes), then by one evaluation of the winner;
4. a ``sweep`` artifact holds the table of every run's validation scores, the winner and its
   test metrics.

The stage never imports another stage: ``train`` and ``evaluate`` are given by the caller
(the CLI wires in ``unlearn`` and ``evaluate``); it reads their artifacts only. Runs are
written beside ``out`` in ``{out}.runs/`` (one folder per run, and ``test-eval``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from mmie.core.artifacts import Artifact, load, save
from mmie.core.data import read_texts, text_hash
from mmie.core.errors import ArtifactError, DataError
from mmie.core.progress import SILENT, Progress
from mmie.core.provenance import check_out, config_inputs
from mmie.sweep.grid import Point, SweepConfig

WINNER_RULE = ("runs whose kept checkpoint met the validation rule first; then the lowest "
               "validation forget-language mass; ties: the earlier run")
Train = Callable[[dict, Path], Path]    # (overrides, out) -> adapter artifact path
Evaluate = Callable[[Path, Path], Path]  # (adapter, out) -> eval artifact path


def runs_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.runs"


def run_row(point: Point, adapter: Artifact) -> dict:
    """One table row: the run's settings and its kept checkpoint's validation scores."""
    val = adapter.metrics.get("validation")
    if not val:
        raise ArtifactError(f"{adapter.path}: no validation record (a sweep trains every run "
                            "with the grid's validation split)")
    chosen, curve = val["chosen"], adapter.metrics.get("curve", [])
    retention = [r for r in (chosen.get("retention") or {}).values() if r is not None]
    return {"run": point.name, "settings": point.overrides, "adapter": str(adapter.path),
            "chosen_step": val["chosen_step"], "qualified": val["qualified"],
            "forget_mass": chosen.get("forget_mass"),
            "step0_forget_mass": val["curve"][0].get("forget_mass"),
            "retain_ppl_ratio": chosen.get("retain_ppl_ratio"),
            "retention": chosen.get("retention"),
            "min_retention": min(retention) if retention else None,
            "train_seconds": sum(r.get("seconds", 0.0) for r in curve)
            + (adapter.metrics.get("reference_seconds") or 0.0),
            "validation_seconds": sum(r.get("seconds", 0.0) for r in val["curve"])}


def pick(rows: Sequence[dict]) -> dict:
    """The winner (module docstring, rule 2)."""
    def key(item: tuple[int, dict]) -> tuple:
        i, row = item
        mass = row["forget_mass"]
        return (not row["qualified"], mass if mass is not None else math.inf, i)

    return min(enumerate(rows), key=key)[1]


def _paths(value) -> list[str]:
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)] if value else []
    return [str(value)] if value else []


def split_paths(c: SweepConfig) -> tuple[list[str], list[str]]:
    """(training + validation files, test files) whose texts must not overlap. The test's
    ``forget_train`` (MIA members) and adversarial prompts are left out: they are meant to be
    training texts, or are instructions, not held-out sentences."""
    seen = _paths([c.unlearn.get("forget"), c.unlearn.get("retain"),
                   c.unlearn.get("alternative"), c.validation.get("forget"),
                   c.validation.get("retain"), c.validation.get("protect")])
    test = _paths([c.test.get(k) for k in ("forget", "retain", "xlang", "romanized", "mixed")])
    return seen, test


def check_test_held_out(c: SweepConfig) -> None:
    """Refuse a test text that is also a training or validation text (rule 3)."""
    field = c.unlearn.get("field", "text")
    seen_paths, test_paths = split_paths(c)
    seen = {text_hash(t) for p in seen_paths for t in read_texts(p, field=field)}
    for path in test_paths:
        texts = read_texts(path, field=c.test.get("field", field))
        shared = [i for i, t in enumerate(texts) if text_hash(t) in seen]
        if shared:
            raise DataError(f"test file {path}: {len(shared)} of {len(texts)} texts are also "
                            f"training or validation texts (first: text {shared[0] + 1}); the "
                            "test split must be held out")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def table_md(rows: Sequence[dict], winner: dict, test: dict) -> str:
    head = ["run", "settings", "kept step", "met rule", "val forget mass", "step-0 mass",
            "val ppl ratio", "min retention", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        cells = [r["run"], settings, r["chosen_step"], "yes" if r["qualified"] else "no",
                 r["forget_mass"], r["step0_forget_mass"], r["retain_ppl_ratio"],
                 r["min_retention"], r["train_seconds"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += ["", f"Winner (validation only): **{winner['run']}**"
              + ("" if winner["qualified"] else " (no run met the validation rule)"),
              "", f"Test (read once, winner only): `{test['eval']}`", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(test["metrics"].items())]
    return "\n".join(lines) + "\n"


def run(config: SweepConfig, out: Path | str, *, train: Train, evaluate: Evaluate,
        force: bool = False, progress: Progress = SILENT) -> Artifact:
    """Train and validate every run, test the winner once, write the ``sweep`` artifact."""
    out = Path(out)
    check_out(out, config_inputs(config.to_dict()), force=force)
    points, rows, adapters = config.points(), [], []
    with progress.task("sweep", total=len(points)) as task:
        for point in points:
            adapter = load(train(point.overrides, runs_dir(out) / point.name), kind="adapter")
            adapters.append(adapter)
            rows.append(run_row(point, adapter))
            task.advance()
            task.log(f"{point.name}: val forget mass {_fmt(rows[-1]['forget_mass'])}, "
                     f"met rule: {rows[-1]['qualified']}")
    winner = pick(rows)
    check_test_held_out(config)
    evaluated = load(evaluate(Path(winner["adapter"]), runs_dir(out) / "test-eval"),
                     kind="eval")
    test = {"eval": str(evaluated.path), "run": winner["run"],
            "metrics": {k: v.get("value") for k, v in evaluated.metrics.items()
                        if isinstance(v, dict)}}
    metrics = {"runs": rows, "winner": winner["run"], "any_qualified": winner["qualified"],
               "test": test, "rule": WINNER_RULE}
    files = {"sweep.md": table_md(rows, winner, test),
             "runs.jsonl": "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)}
    return save(out, "sweep", tensors={}, config=config.to_dict(), model=adapters[0].model,
                parents=[a.path for a in adapters] + [evaluated.path], metrics=metrics,
                files=files, force=force)
