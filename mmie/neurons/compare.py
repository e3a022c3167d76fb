"""Score dynamics of frozen neurons after fine-tuning: representational drift or redistribution?

Two score artifacts of the same texts (before and after a frozen-neuron fine-tune) and the mask
of frozen neurons. Per neuron the relative change is ``(after - before) / before``; neurons
with a zero score before have none and are left out (counted in ``excluded_zero_before``).

Verdict, on the mean of the frozen neurons' relative changes ``m``:

- ``A`` (representational drift): ``m < -drift`` -- the frozen neurons lost importance even
  though their weights did not move: the rest of the network stopped feeding them.
- ``B`` (global redistribution): ``|m| < stable`` -- their importance stayed; whatever changed
  happened elsewhere.
- ``inconclusive`` otherwise (a drop between the thresholds, or a rise of ``stable`` or more).

Whether frozen neurons changed *differently* from the others is tested on the relative changes
with a two-sided Mann-Whitney U test and a permutation test of the difference in means
(``p = (1 + #{|d*| >= |d|}) / (n_perm + 1)``). Histograms of log10 scores before/after and of
the relative changes are saved as PNG files inside the artifact.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from mmie.core.artifacts import Artifact, check_model, save
from mmie.core.errors import ArtifactError, MetricError
from mmie.edits.neurons import load_mask, load_role, per_layer

SCORES_STEM = "scores"
# Score settings that must match for two artifacts' scores to be comparable (see
# mmie.neurons.scores: ||X|| depends on the exact token set).
SAME = ("data_sha256", "field", "max_samples", "max_length", "seed", "layout")
VERDICTS = {"A": "representational drift", "B": "global redistribution",
            "inconclusive": "neither threshold met"}


@dataclass(frozen=True)
class CompareConfig:
    """Settings of `neurons compare`.

    before, after: score artifacts of the same texts, before and after fine-tuning.
    neurons: the mask artifact of the frozen neurons.
    drift: verdict A when the frozen neurons' mean relative change is below ``-drift``.
    stable: verdict B when its absolute value is below ``stable`` (``stable <= drift``).
    score: the score quantity compared (``wanda`` by default).
    n_perm, seed: permutations of the difference-in-means test and their seed.
    """

    before: str = ""
    after: str = ""
    neurons: str = ""
    drift: float = 0.10
    stable: float = 0.05
    score: str = "wanda"
    n_perm: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.before and self.after and self.neurons):
            raise ValueError("before, after and neurons artifacts are all required")
        if not 0 < self.stable <= self.drift:
            raise ValueError(f"need 0 < stable <= drift, got stable={self.stable}, "
                             f"drift={self.drift}")
        if self.n_perm < 1:
            raise ValueError(f"n_perm must be >= 1, got {self.n_perm}")


def verdict(mean_change: float, drift: float, stable: float) -> str:
    """``A``, ``B`` or ``inconclusive`` for the frozen neurons' mean relative change."""
    if mean_change < -drift:
        return "A"
    if abs(mean_change) < stable:
        return "B"
    return "inconclusive"


def relative_change(before: Tensor, after: Tensor) -> Tensor:
    """``(after - before) / before``, NaN where ``before`` is not positive."""
    before, after = before.double(), after.double()
    return torch.where(before > 0, (after - before) / before.clamp_min(1e-300),
                       torch.full_like(before, math.nan))


def summary(values: Tensor) -> dict:
    if values.numel() == 0:
        return {"n": 0, "mean": None, "median": None, "std": None}
    v = values.double()
    return {"n": int(v.numel()), "mean": float(v.mean()), "median": float(v.median()),
            "std": float(v.std(unbiased=False))}


def permutation_pvalue(x: np.ndarray, y: np.ndarray, n_perm: int, seed: int) -> float:
    """Two-sided permutation test of ``mean(x) - mean(y)``, in chunks of 64 permutations."""
    pooled, n, rng = np.concatenate([x, y]), len(x), np.random.default_rng(seed)
    observed, total, hits, done = abs(x.mean() - y.mean()), pooled.sum(), 0, 0
    while done < n_perm:
        rows = min(64, n_perm - done)
        idx = np.argpartition(rng.random((rows, len(pooled))), n - 1, axis=1)[:, :n]
        sum_x = pooled[idx].sum(1)
        diff = np.abs(sum_x / n - (total - sum_x) / (len(pooled) - n))
        hits += int((diff >= observed - 1e-12 * max(1.0, observed)).sum())
        done += rows
    return (1 + hits) / (n_perm + 1)


def _tests(frozen: Tensor, other: Tensor, n_perm: int, seed: int) -> dict:
    if frozen.numel() < 1 or other.numel() < 1:
        reason = "needs at least one frozen and one other neuron with a positive score"
        return {name: {"value": None, "missing": reason} for name in ("mann_whitney", "perm")}
    from scipy.stats import mannwhitneyu

    x, y = frozen.double().numpy(), other.double().numpy()
    test = mannwhitneyu(x, y, alternative="two-sided")
    return {"mann_whitney": {"u": float(test.statistic), "p": float(test.pvalue)},
            "perm": {"diff_of_means": float(x.mean() - y.mean()),
                     "p": permutation_pvalue(x, y, n_perm, seed), "n_perm": n_perm}}


def _group(before: Tensor, after: Tensor, change: Tensor) -> dict:
    sum_before = float(before.double().sum())
    return {"before": summary(before), "after": summary(after), "change": summary(change),
            "change_of_total": float(after.double().sum()) / sum_before - 1 if sum_before
            else None}


def dynamics(before: Tensor, after: Tensor, frozen: Tensor, config: CompareConfig) -> dict:
    """Every statistic of the module docstring for flat score vectors and a bool mask."""
    change = relative_change(before, after)
    valid = torch.isfinite(change)
    groups = {"frozen": frozen & valid, "other": ~frozen & valid}
    if not groups["frozen"].any():
        raise MetricError("no frozen neuron has a positive score before fine-tuning; "
                          "nothing to compare")
    stats = {g: _group(before[m], after[m], change[m]) for g, m in groups.items()}
    mean = stats["frozen"]["change"]["mean"]
    label = verdict(mean, config.drift, config.stable)
    return {**stats, **_tests(change[groups["frozen"]], change[groups["other"]],
                              config.n_perm, config.seed),
            "excluded_zero_before": int((~valid).sum()), "frozen_mean_change": mean,
            "verdict": label, "verdict_label": VERDICTS[label],
            "thresholds": {"drift": config.drift, "stable": config.stable}}


# --- artifacts --------------------------------------------------------------------------------

def _comparable(before: Artifact, after: Artifact) -> None:
    check_model(after.path, after.model, before.model)
    if diff := [k for k in SAME if before.config.get(k) != after.config.get(k)]:
        raise ArtifactError(f"{before.path} and {after.path} were scored differently ("
                            + "; ".join(f"{k}: {before.config.get(k)!r} vs "
                                        f"{after.config.get(k)!r}" for k in diff)
                            + "); scores are only comparable on the same texts and settings")


def _aligned(c: CompareConfig) -> tuple[dict[int, Tensor], dict[int, Tensor],
                                        dict[int, Tensor], list[Artifact]]:
    before = load_role(c.before, ("scores",))
    after = load_role(c.after, ("scores",))
    _comparable(before, after)
    mask_art, masks = load_mask(c.neurons, before.model)
    b = per_layer(before.tensors(SCORES_STEM), c.score, c.before)
    a = per_layer(after.tensors(SCORES_STEM), c.score, c.after)
    if missing := sorted(set(masks) - set(b)):
        raise ArtifactError(f"{c.neurons}: mask layers {missing} were not scored in {c.before}")
    for i, mask in masks.items():
        if not (b[i].shape == a[i].shape == mask.shape):
            raise ArtifactError(f"layer {i}: widths differ (before {list(b[i].shape)}, after "
                                f"{list(a[i].shape)}, mask {list(mask.shape)})")
    layers = sorted(masks)
    return ({i: b[i] for i in layers}, {i: a[i] for i in layers}, masks,
            [before, after, mask_art])


def _finite_mean(values: Tensor) -> float | None:
    values = values[torch.isfinite(values)]
    return float(values.mean()) if values.numel() else None


def _per_layer(before: dict, after: dict, masks: dict) -> dict:
    out = {}
    for i, mask in masks.items():
        change = relative_change(before[i], after[i])
        out[i] = {"n_frozen": int(mask.sum()), "frozen_mean_change": _finite_mean(change[mask]),
                  "other_mean_change": _finite_mean(change[~mask])}
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def score_histograms(before: Tensor, after: Tensor, frozen: Tensor) -> bytes:
    """log10 scores before and after, frozen neurons left, the others right."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close

    fig = Figure(figsize=(10, 4), layout="tight")
    for ax, (name, mask) in zip(fig.subplots(1, 2), (("frozen", frozen), ("other", ~frozen)),
                                strict=True):
        logs = {label: values[values > 0].double().log10().numpy()
                for label, values in (("before", before[mask]), ("after", after[mask]))}
        if sum(len(v) for v in logs.values()):
            # shared bin edges, so before and after bars line up
            edges = np.histogram_bin_edges(np.concatenate(list(logs.values())), bins=50)
            for label, values in logs.items():
                ax.hist(values, bins=edges, alpha=0.5, density=True, label=label)
        ax.set(title=f"{name} neurons (n={int(mask.sum())})", xlabel="log10 score",
               ylabel="density")
        ax.legend()
    return _png(fig)


def change_histogram(change: Tensor, frozen: Tensor, drift: float, stable: float) -> bytes:
    """Relative score change of frozen vs other neurons, with the verdict thresholds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    finite = change[torch.isfinite(change)].numpy()
    low, high = (np.quantile(finite, [0.01, 0.99]) if len(finite) else (-1.0, 1.0))
    for name, mask in (("frozen", frozen), ("other", ~frozen)):
        values = change[mask & torch.isfinite(change)].numpy()
        if len(values):
            ax.hist(values.clip(low, high), bins=50, range=(low, high), alpha=0.5, density=True,
                    label=f"{name} (n={len(values)})")
    ax.axvline(-drift, color="red", linestyle="--", label=f"-drift ({drift:g})")
    for x, label in ((-stable, f"±stable ({stable:g})"), (stable, None)):
        ax.axvline(x, color="green", linestyle=":", label=label)
    ax.set(xlabel="relative score change (after - before) / before", ylabel="density",
           title="score change: frozen vs other neurons")
    ax.legend()
    return _png(fig)


def run_compare(config: CompareConfig, out, *, force: bool = False) -> Artifact:
    """Compare before/after scores of the frozen neurons and save the verdict (role compare)."""
    before, after, masks, parents = _aligned(config)
    flat = lambda d: torch.cat([d[i] for i in sorted(masks)])  # noqa: E731
    b, a, frozen = flat(before), flat(after), flat(masks)
    metrics = {**dynamics(b, a, frozen, config), "per_layer": _per_layer(before, after, masks)}
    change = relative_change(b, a)
    files = {"hist_scores.png": score_histograms(b, a, frozen),
             "hist_change.png": change_histogram(change, frozen, config.drift, config.stable)}
    tensors = {"change": {f"layer{i}.change": relative_change(before[i], after[i]).float()
                          for i in sorted(masks)}}
    return save(out, "neurons", tensors=tensors, config={**asdict(config), "role": "compare"},
                model=parents[0].model, parents=[p.path for p in parents], metrics=metrics,
                files=files, force=force)
