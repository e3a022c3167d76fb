"""Checks at the places where two artifacts, or an artifact and new options, are combined.

* ``--out`` is checked before any work (:func:`check_out`): it must name a folder that is not a
  file, not a foreign folder, not an existing artifact (without ``--force``), and it must not
  be, contain or sit inside any input, so ``--force`` can never replace what the run reads.
  Temp folders beside it left by a killed run are removed then too.
* A comparison refuses inputs made from different base models, a baseline that is itself an
  intervention's eval, and a baseline passed again as an arm (:func:`check_gate_inputs`,
  :func:`check_eval_baseline`).
* A resume compares every recorded setting and input hash with the new ones and names each
  field that differs (:func:`setting_changes`).
* The forget set must not be one of the retain sets (:func:`refuse_same_texts`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmie.core.artifacts import (
    Artifact,
    ModelIdentity,
    check_names_a_folder,
    check_target,
    clean_stale,
    load,
    sha256_file,
)
from mmie.core.errors import ArtifactError, DataError

# config fields that name no input file, whatever their value happens to match on disk (the
# caches and checkpoint folders are working space: an artifact may well be written inside one)
_NOT_PATHS = frozenset({"field", "method", "objective", "retain_loss", "device", "dtype",
                        "arch", "scope", "score", "reft_kind", "gate", "arm", "name_hint",
                        "cache_dir", "checkpoint_dir"})


def config_inputs(*configs: Any) -> list[Path]:
    """Every path named anywhere in ``configs`` (dataclasses, dicts, sequences) that exists."""
    found: list[Path] = []

    def walk(value: Any, key: str = "") -> None:
        if key in _NOT_PATHS:
            return
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f.name)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, key)
        elif isinstance(value, (str, Path)) and str(value) and _exists(Path(value)):
            found.append(Path(value))

    for config in configs:
        walk(config)
    return found


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long or otherwise no path at all
        return False


def _relation(out: Path, path: Path) -> str | None:
    o, p = out.resolve(), path.resolve()
    if o == p:
        return "is"
    if o in p.parents:
        return "contains"
    if p in o.parents:
        return "is inside"
    return None


def check_overlap(out: Path | str, inputs: Iterable[Path | str]) -> None:
    """Refuse an ``out`` that is, contains or is inside one of ``inputs``."""
    out = Path(out)
    for path in inputs:
        if (how := _relation(out, Path(path))) is not None:
            raise ArtifactError(f"--out {out} {how} the input {path}; writing there would "
                                "destroy what this run reads. Choose another --out")


def check_out(out: Path | str, inputs: Iterable[Path | str] = (), *, force: bool = False,
              resume: bool = False, main: bool | None = None) -> Path:
    """Everything about ``out`` that can be known before the work starts (module docstring).
    ``main``: this process writes (default: rank 0 under a launcher, else True)."""
    from mmie.core.distributed import world

    out = Path(out)
    main = world().main if main is None else main
    check_names_a_folder(out)
    check_overlap(out, inputs)  # before the target: "it is your input" says more than "exists"
    check_target(out, force, resume)
    if main:  # only the writing process tidies, so no rank removes another's live folder
        clean_stale(out)
    return out


def writing(config: Any, out: Path | str, *, force: bool = False, resume: bool = False,
            extra: Sequence[Path | str] = ()) -> Any:
    """``check_out`` against every path ``config`` names; returns ``config`` (for CLI chains)."""
    check_out(out, [*config_inputs(config), *extra], force=force, resume=resume)
    return config


# --- comparisons ------------------------------------------------------------------------------

def _fingerprint_text(model: ModelIdentity) -> str:
    shown = ", ".join(f"{k}={str(v)[:16]}" for k, v in sorted(model.fingerprint.items()))
    return f"'{model.name}' ({shown or 'no fingerprint'})"


def check_same_model(what: str, base: Artifact, other: Artifact | ModelIdentity | None) -> None:
    """Refuse when both record a base model and the fingerprints (or sizes) differ."""
    theirs = other.model if isinstance(other, Artifact) else other
    where = str(other.path) if isinstance(other, Artifact) else "the evaluated model"
    mine = base.model
    if mine is None or theirs is None:
        return  # nothing recorded on one side (hand-made artifacts): nothing to compare
    shared = set(mine.fingerprint) & set(theirs.fingerprint)
    same_fp = all(mine.fingerprint[k] == theirs.fingerprint[k] for k in shared)
    same_size = (mine.n_layers, mine.d_model, mine.vocab_size) == \
        (theirs.n_layers, theirs.d_model, theirs.vocab_size)
    if not (same_fp and same_size):
        raise ArtifactError(f"{what} {base.path} was made from base model "
                            f"{_fingerprint_text(mine)} but {where} from "
                            f"{_fingerprint_text(theirs)}; compare runs of one base model")


def intervention_of(eval_artifact: Artifact) -> str | None:
    """What an eval artifact measured besides the base model, or None for the base model."""
    config = eval_artifact.config
    parts = [f"{k} {config[k]}" for k in ("adapter", "sae", "scrub") if config.get(k)]
    return ", ".join(parts) or None


def check_baseline_is_base(baseline: Artifact) -> None:
    if (what := intervention_of(baseline)) is not None:
        raise ArtifactError(f"--baseline {baseline.path} is the eval of an edited model "
                            f"({what}), not of the base model; pass the base model's eval")


def check_gate_inputs(baseline: Path | str, evals: Sequence[Path | str]) -> None:
    """The baseline is a base-model eval, is not also an arm, and shares every arm's model."""
    base = load(baseline, kind="eval")
    check_baseline_is_base(base)
    for path in evals:
        if Path(path).resolve() == Path(baseline).resolve() or \
                sha256_file(Path(path) / "manifest.json") == \
                sha256_file(Path(baseline) / "manifest.json"):
            raise ArtifactError(f"--eval {path} is the baseline {baseline} itself; an arm "
                                "compared with itself proves nothing")
        check_same_model("baseline", base, load(path, kind="eval"))


def check_eval_baseline(baseline: Artifact | None, model: ModelIdentity | None = None,
                        adapter: str | Path | None = None) -> None:
    """``evaluate --baseline``: a base-model eval, of the model evaluated (and adapted)."""
    if baseline is None:
        return
    check_baseline_is_base(baseline)
    if adapter is not None:
        check_same_model("baseline", baseline, load(adapter))  # an adapter or a neurons mask
    if model is not None:
        check_same_model("baseline", baseline, model)


# --- resume and data ----------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                    ignore: Iterable[str] = ()) -> list[str]:
    """``'name: old -> new'`` for every field that differs (after a JSON round trip)."""
    a, b, skip = _plain(dict(saved)), _plain(dict(current)), set(ignore)
    return [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now"
            for k in sorted({*a, *b} - skip) if a.get(k) != b.get(k)]


def file_hash(path: str | Path) -> str | None:
    """The sha256 of an input file (None for a folder or a hub name)."""
    return sha256_file(Path(path)) if Path(path).is_file() else None


def file_hashes(paths: Iterable[str | Path | None]) -> dict[str, str | None]:
    """:func:`file_hash` of each path given."""
    return {str(p): file_hash(p) for p in paths if p}


def refuse_same_texts(forget: str | Path, retain: Sequence[str | Path]) -> None:
    """The forget set must not also be a retain set (same file, or same content)."""
    target = Path(forget)
    mine = sha256_file(target) if target.is_file() else None
    for other in retain:
        path = Path(other)
        same = path.resolve() == target.resolve() or (
            mine is not None and path.is_file() and sha256_file(path) == mine)
        if same:
            raise DataError(f"the forget set {forget} is also given as retain set {other}; "
                            "a model cannot forget and keep the same texts")


def gate_start(baseline: Path | str, evals: Sequence[Path | str], out: Path | str,
               force: bool) -> None:
    """Everything `gate` can refuse before it computes: ``out``, then what it combines."""
    check_out(out, [baseline, *evals], force=force)
    check_gate_inputs(baseline, evals)
