"""Synthetic eval records for the gate tests: a model is a profile of true rates and means.

Texts carry a latent difficulty shared by every model (the same prompts and texts are scored
by the baseline and each arm), so paired statistics see the correlation real evals have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mmie.core.artifacts import save
from mmie.gate.metrics import EvalRecords

DATA = {"sha256": {"forget": "aa", "retain": "bb", "xlang:ur": "cc"}, "n_prompts": 100,
        "max_new_tokens": 32, "forget_lang": "hi", "replacement_lang": "en",
        "protected": ["ur", "pa", "bn"]}
FAMILIES = ("romanized", "mixed", "adversarial")


@dataclass(frozen=True)
class Profile:
    """True rates on each prompt set and means of the forward-only measures."""

    forget: float          # P(forget language) on 'forget' prompts
    degenerate: float      # P(degenerate) on 'forget' prompts
    substitute: float      # P(another language) on 'forget' prompts; the rest is English
    unfluent: float        # P(fluent = false) among English answers
    leak: float            # P(forget language) on xlang prompts
    own: float             # P(own language) on xlang prompts
    variant: float         # P(forget language) on romanized/mixed/adversarial prompts
    nll: float             # retain NLL per token
    forget_mass: float     # mean forget-token mass on 'forget' continuations
    own_mass: float        # mean own-language mass on xlang texts
    mia_gap: float         # member loss lowered by this much (0: no membership signal)
    fluency: float = 3.0   # base-model NLL of 'forget' continuations
    forget_rise: float = 0.0  # loss raised by this much on every forget text (MIA rows)


BASE = Profile(forget=0.9, degenerate=0.02, substitute=0.03, unfluent=0.0, leak=0.01, own=0.97,
               variant=0.5, nll=2.0, forget_mass=0.8, own_mass=0.7, mia_gap=0.0)
GOOD = Profile(forget=0.005, degenerate=0.01, substitute=0.01, unfluent=0.01, leak=0.005,
               own=0.97, variant=0.02, nll=2.005, forget_mass=0.2, own_mass=0.7, mia_gap=0.0,
               forget_rise=1.0)
PERFECT = Profile(forget=0.0, degenerate=0.0, substitute=0.0, unfluent=0.0, leak=0.0, own=1.0,
                  variant=0.0, nll=2.0, forget_mass=0.01, own_mass=0.7, mia_gap=0.0,
                  forget_rise=1.0)


@dataclass(frozen=True)
class Sizes:
    """Prompts or texts per set."""

    forget: int = 100
    xlang: int = 100
    family: int = 100      # per family, unless ``families`` names it
    retain: int = 100
    members: int = 100     # MIA: forget-train texts
    nonmembers: int = 100  # MIA: held-out forget texts
    xlangs: tuple[str, ...] = ("ur",)
    families: tuple[tuple[str, int], ...] = ()

    def family_size(self, name: str) -> int:
        return dict(self.families).get(name, self.family)


def _flags(rng, n: int, p: float) -> np.ndarray:
    return rng.random(n) < p


def _forget_rows(p: Profile, n: int, rng) -> list[dict]:
    u = rng.random(n)
    cut = np.cumsum([p.forget, p.degenerate, p.substitute])
    rows = []
    for i, v in enumerate(u):
        kind = int(np.searchsorted(cut, v, side="right"))
        lang = ["hi", "und", "zh", "en"][kind]
        rows.append({"set": "forget", "idx": i, "lang": lang, "is_forget": int(kind == 0),
                     "is_own": None, "degenerate": int(kind == 1),
                     "fluent": int(kind == 3 and rng.random() >= p.unfluent),  # 0/1, as evaluate
                     "fluency_nll": float(p.fluency + rng.normal(0, 0.2))})
    return rows


def _xlang_rows(p: Profile, name: str, n: int, rng) -> list[dict]:
    leak, own = _flags(rng, n, p.leak), _flags(rng, n, p.own)
    return [{"set": f"xlang:{name}", "idx": i, "lang": "hi" if lk else (name if ow else "en"),
             "is_forget": int(lk), "is_own": int(ow and not lk), "degenerate": 0,
             "fluency_nll": None} for i, (lk, ow) in enumerate(zip(leak, own, strict=True))]


def samples(p: Profile, s: Sizes, rng) -> list[dict]:
    rows = _forget_rows(p, s.forget, rng)
    for name in s.xlangs:
        rows += _xlang_rows(p, name, s.xlang, rng)
    for fam in FAMILIES:
        rows += [{"set": fam, "idx": i, "lang": "hi" if hit else "en", "is_forget": int(hit),
                  "is_own": None, "degenerate": 0, "fluency_nll": None}
                 for i, hit in enumerate(_flags(rng, s.family_size(fam), p.variant))]
    return rows


def _latent(n: int, salt: int) -> np.ndarray:
    """Per-text difficulty, identical for every model."""
    return np.random.default_rng(1000 + salt).normal(0, 1, n)


def ppl(p: Profile, s: Sizes, rng) -> list[dict]:
    d, tokens = _latent(s.retain, 1), 10 + (np.abs(_latent(s.retain, 2)) * 10).astype(int)
    return [{"set": "retain", "idx": i, "n_tokens": int(t),
             "nll_sum": float(t * (p.nll + 0.3 * d[i] + rng.normal(0, 0.02)))}
            for i, t in enumerate(tokens)]


def mass(p: Profile, s: Sizes, rng) -> list[dict]:
    d = _latent(s.forget, 3)
    rows = [{"set": "forget", "idx": i, "n_tokens": 20, "own_mass": None,
             "replacement_mass": None,
             "forget_mass": float(np.clip(p.forget_mass * (1 + 0.3 * d[i])
                                          + rng.normal(0, 0.02), 0, 1))}
            for i in range(s.forget)]
    for name in s.xlangs:
        e = _latent(s.xlang, 4)
        rows += [{"set": f"xlang:{name}", "idx": i, "n_tokens": 20, "forget_mass": 0.01,
                  "replacement_mass": None,
                  "own_mass": float(np.clip(p.own_mass * (1 + 0.2 * e[i])
                                            + rng.normal(0, 0.02), 0, 1))}
                 for i in range(s.xlang)]
    return rows


def mia(p: Profile, s: Sizes, rng) -> list[dict]:
    total = s.members + s.nonmembers
    loss = 3.0 + _latent(total, 5)
    return [{"idx": i, "member": int(i < s.members), "mink_pp": 0.0,
             "loss": float(loss[i] + p.forget_rise - p.mia_gap * (i < s.members)
                           + rng.normal(0, 0.1))}
            for i in range(total)]


def files(p: Profile, s: Sizes, rng) -> dict[str, list[dict]]:
    return {"samples.jsonl": samples(p, s, rng), "ppl.jsonl": ppl(p, s, rng),
            "mass.jsonl": mass(p, s, rng), "mia.jsonl": mia(p, s, rng)}


def _keyed(rows: list[dict]) -> dict:
    return {(r["set"], r["idx"]): r for r in rows}


def records(arm: str, seed: int, p: Profile, s: Sizes, rng, data=None) -> EvalRecords:
    """In-memory records, as :func:`mmie.gate.metrics.read_eval` would return them."""
    f = files(p, s, rng)
    return EvalRecords(path=f"<{arm}/{seed}>", arm=arm, seed=seed, data=data or DATA,
                       samples=_keyed(f["samples.jsonl"]), ppl=_keyed(f["ppl.jsonl"]),
                       mia=f["mia.jsonl"], mass=_keyed(f["mass.jsonl"]))


def write(root: Path, name: str, arm: str, seed: int, p: Profile, s: Sizes, rng, *,
          data=None, drop=(), edit=None, metrics=None) -> Path:
    """An eval artifact on disk; ``drop`` leaves files out, ``edit`` rewrites the records."""
    f = {k: v for k, v in files(p, s, rng).items() if k not in drop}
    if edit is not None:
        f = edit(f)
    text = {k: "".join(json.dumps(r) + "\n" for r in rows) for k, rows in f.items()}
    save(root / name, "eval", tensors={}, config={"arm": arm, "seed": seed, "data": data or DATA},
         model=None, files=text, metrics=metrics or {})
    return root / name


__all__ = ["BASE", "DATA", "GOOD", "PERFECT", "Profile", "Sizes", "records", "replace", "write"]
