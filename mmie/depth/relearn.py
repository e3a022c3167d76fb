"""`mmie relearn`: does a cheap fine-tuning attack bring the forgotten language back?

The attack (:mod:`mmie.depth.attack`) runs twice from fresh model loads: on the arm (LoRA arm
merged, inference-time parts kept applied, see :mod:`mmie.depth.arms`) and on the base model as
the reference. At each checkpoint the held-out forget texts (and any control sets, e.g. Urdu:
a protected language the attack should not be needed for) are scored; the recovery fraction
per step and metric (:mod:`mmie.depth.recovery`) gets a bootstrap interval over texts.

The attack set must be disjoint from every evaluation text: texts are compared by the sha256 of
their NFC-normalised, whitespace-collapsed form, and a run whose attack set shares any text
with the held-out, control or ``eval_texts`` files is refused before a model loads. The
manifest records every attack and evaluation text hash, so the disjointness can be re-checked
from the artifact alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mmie.core.artifacts import Artifact, ModelIdentity, save, sha256_file
from mmie.core.data import read_texts, text_hash
from mmie.core.errors import ArtifactError, DataError
from mmie.core.models import ModelSpec, loaded
from mmie.core.progress import SILENT, Progress
from mmie.depth.arms import ArmSpec, applied, fixed_adapter
from mmie.depth.attack import AttackSpec, TextScore, attack_lora, run_attack, score_texts
from mmie.depth.attack import script_token_ids as _script_ids
from mmie.depth.recovery import Sums, plot_png, recovery_interval

METRICS = ("nll", "script_mass")


@dataclass(frozen=True)
class RelearnConfig:
    """attack: forget-language texts the attacker fine-tunes on (first ``max_attack`` used).
    heldout: held-out forget-language texts scored at every checkpoint.
    controls: (name, file) sets scored too (e.g. a protected language).
    eval_texts: further evaluation files the attack set must not overlap.
    forget_script: script whose next-token probability mass is measured (Deva for Hindi).
    """

    attack: str
    heldout: str
    model: ModelSpec = ModelSpec()
    arm: ArmSpec = ArmSpec()
    spec: AttackSpec = AttackSpec()
    controls: tuple[tuple[str, str], ...] = ()
    eval_texts: tuple[str, ...] = ()
    field: str = "text"
    max_attack: int | None = 50
    max_heldout: int | None = None
    forget_script: str = "Deva"
    batch_size: int = 8
    n_boot: int = 2000
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if not self.attack or not self.heldout:
            raise ValueError("an attack file and a held-out file are both required")
        if any(not n or not p for n, p in self.controls):
            raise ValueError("every control set needs a name and a file (NAME=FILE)")
        for name in ("max_attack", "max_heldout"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name.replace('_', '-')} must be >= 2, got {value}")
        if self.batch_size < 1 or self.n_boot < 1 or not 0 < self.alpha < 1:
            raise ValueError("batch_size >= 1, n_boot >= 1 and alpha in (0, 1) are required")


@dataclass
class RelearnSets:
    attack: list[str]
    scored: dict[str, list[str]]   # "heldout", "control:<name>"
    hashes: dict[str, list[str]]   # "attack", "eval"


def check_disjoint(attack: list[str], evaluation: dict[str, list[str]]) -> dict[str, list[str]]:
    """The attack and evaluation text hashes; DataError if any attack text is evaluated."""
    attack_h = [text_hash(t) for t in attack]
    eval_h = {text_hash(t): source for source, texts in evaluation.items() for t in texts}
    if shared := [(t, eval_h[h]) for t, h in zip(attack, attack_h, strict=True) if h in eval_h]:
        text, source = shared[0]
        raise DataError(f"{len(shared)} attack text(s) also appear in the evaluation texts "
                        f"(first: {text[:60]!r} in {source}); the attack set must be disjoint")
    return {"attack": attack_h, "eval": sorted(eval_h)}


def read_sets(c: RelearnConfig) -> RelearnSets:
    attack = read_texts(c.attack, c.field, c.max_attack)
    scored = {"heldout": read_texts(c.heldout, c.field, c.max_heldout)}
    scored.update({f"control:{n}": read_texts(p, c.field, c.max_heldout) for n, p in c.controls})
    if len(scored["heldout"]) < 2:
        raise DataError(f"{c.heldout}: a bootstrap over texts needs at least 2 held-out texts")
    # whole files, not only the scored part: a text an evaluation may use is off limits
    evaluation = {p: read_texts(p, c.field)
                  for p in (c.heldout, *(p for _, p in c.controls), *c.eval_texts)}
    return RelearnSets(attack, scored, check_disjoint(attack, evaluation))


@dataclass
class RunResult:
    scores: dict[int, dict[str, list[TextScore]]]   # step -> set -> per text
    losses: list[float]
    record: dict
    n_script_tokens: int
    identity: ModelIdentity


def _arm_name(fixed: dict, hooked: dict) -> str:
    """Named as `evaluate` names arms: ``<method>-<objective>`` or ``base``, then the hooks."""
    hooks = [hooked["arm"]] if hooked["arm"] != "base" else []
    return "+".join([fixed["arm"] if fixed else "base", *hooks])


def attack_once(c: RelearnConfig, arm: ArmSpec, sets: RelearnSets, progress: Progress,
                desc: str) -> RunResult:
    """Load the model, fix the arm in place, attack, score at every checkpoint."""
    with loaded(c.model) as lm:
        ids = _script_ids(lm, c.forget_script)
        with fixed_adapter(lm, arm) as fixed:
            adapter = attack_lora(lm, c.spec)
            with applied(lm, arm, adapter=False) as hooked:
                def measure() -> dict[str, list[TextScore]]:
                    return {name: score_texts(lm, texts, ids, c.spec.max_length, c.batch_size)
                            for name, texts in sets.scored.items()}

                scores, losses = run_attack(lm, adapter, sets.attack, c.spec, measure,
                                            progress, desc)
                kept = sorted(k for k in hooked if k not in ("arm", "adapter"))
                record = {"arm": _arm_name(fixed, hooked), "adapter": fixed or None,
                          "kept_during_attack": kept + ([fixed["method"]] if fixed and not
                                                        fixed["merged"] else []),
                          **{k: hooked[k] for k in kept}}
        return RunResult(scores, losses, record, len(ids), lm.identity)


def _sums(scores: list[TextScore], metric: str) -> Sums:
    num = [s.nll_sum if metric == "nll" else s.mass_sum for s in scores]
    return Sums.of(num, [s.n_tokens for s in scores])


def _curves(run: RunResult, name: str, metrics: tuple[str, ...]) -> dict:
    return {m: {str(k): float(_sums(by_set[name], m).value()) for k, by_set in
                run.scores.items()} for m in metrics}


def _recovery(c: RelearnConfig, before: dict, after: dict, base: dict, metric: str) -> dict:
    if c.arm.is_base:
        # two attacks on the same model differ at most by run-to-run noise: no fraction of it
        return {"value": None, "missing": "no arm given: the base model was attacked twice"}
    return recovery_interval(_sums(before["heldout"], metric), _sums(after["heldout"], metric),
                             _sums(base["heldout"], metric), n_boot=c.n_boot, alpha=c.alpha,
                             seed=c.spec.seed)


def summarize(c: RelearnConfig, runs: dict[str, RunResult]) -> dict:
    arm, base = runs["arm"], runs["base"]
    metrics = METRICS if arm.n_script_tokens else ("nll",)
    missing = {} if arm.n_script_tokens else {"script_mass": (
        f"the tokenizer has no token decoding to {c.forget_script} text (byte-level pieces?)")}
    recovery = {m: {str(k): _recovery(c, arm.scores[0], by_set, base.scores[0], m)
                    for k, by_set in arm.scores.items()} for m in metrics}
    controls = {n: {r: _curves(runs[r], f"control:{n}", metrics) for r in runs}
                for n, _ in c.controls}
    return {"steps": list(c.spec.steps), "metrics": list(metrics), "missing": missing,
            "curves": {r: _curves(runs[r], "heldout", metrics) for r in runs},
            "recovery": recovery, "controls": controls,
            "losses": {r: runs[r].losses for r in runs}, "arm_name": arm.record["arm"],
            "kept_during_attack": arm.record["kept_during_attack"],
            "n_script_tokens": arm.n_script_tokens}


def _score_rows(runs: dict[str, RunResult]) -> str:
    rows = [{"run": r, "step": k, "set": name, "idx": i, **asdict(s)}
            for r, run in runs.items() for k, by_set in run.scores.items()
            for name, scores in by_set.items() for i, s in enumerate(scores)]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _file_records(c: RelearnConfig, sets: RelearnSets) -> dict:
    files = {"attack": c.attack, "heldout": c.heldout,
             **{f"control:{n}": p for n, p in c.controls},
             **{f"eval:{i}": p for i, p in enumerate(c.eval_texts)}}
    return {k: {"path": str(p), "sha256": sha256_file(Path(p)) if Path(p).is_file() else None}
            for k, p in files.items()} | {"n_attack": len(sets.attack)}


def run(config: RelearnConfig, out: Path | str, *, force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Attack arm and base, measure, save and return the ``relearn`` artifact."""
    if Path(out).exists() and not force:
        raise ArtifactError(f"{out} already exists; pass --force to replace it")
    sets = read_sets(config)
    runs = {"arm": attack_once(config, config.arm, sets, progress, "relearn arm"),
            "base": attack_once(config, ArmSpec(), sets, progress, "relearn base")}
    metrics = summarize(config, runs)
    settings = {**asdict(config), "hashes": sets.hashes, "data": _file_records(config, sets),
                "applied": runs["arm"].record}
    files = {"scores.jsonl": _score_rows(runs), "relearn.png": plot_png(metrics)}
    parents = [Path(p) for p in (config.arm.adapter, config.arm.sae, config.arm.scrub,
                                 config.arm.neurons) if p]
    return save(out, "relearn", tensors={}, config=settings, model=runs["arm"].identity,
                parents=parents, metrics=metrics, files=files, force=force)
