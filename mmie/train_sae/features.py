"""Quality of trained SAEs and their forget-language latents, measured on held-out text.

The model passes (:mod:`mmie.train_sae.heldout`) run each batch of held-out texts clean, with a
layer's output replaced by its SAE reconstruction, and with it ablated. Only real non-BOS
positions are replaced (the SAEs never saw BOS, an attention-sink outlier) and only predictions
made at those positions count in a loss ``L`` (mean next-token NLL). Under a launcher the
processes share those passes and rank 0 alone computes what follows.

Quality per layer: ``fvu``, ``explained_variance``, ``mean_l0`` (:func:`mmie.sae_optim.metrics` over
all held-out tokens), ``dead_fraction`` (latents silent for the last ``dead_after_tokens``
training tokens), ``never_fired_heldout``, and
``ce_recovered = (L_ablated - L_sae) / (L_ablated - L_clean)``: 1 means splicing the SAE in costs
nothing, 0 means it is as bad as losing the layer. The ablation is ``zero`` (the layer output at
those positions set to 0, SAELens' convention) or ``mean`` (set to the training mean).
A metric that cannot be computed is ``None`` with its reason under ``missing``.

Per latent, on held-out forget (F) and retain (R) tokens: firing frequency ``f`` and mean
activation ``E[a]`` (zeros included); ``selectivity = (f_F - f_R) / (f_F + f_R + 1e-6)`` in [-1,
1], and ``score = selectivity * E_F[a]``, so a latent ranks high when it fires on forget text,
rarely on retain text, and strongly. With protected languages (``train-sae --protect ur=FILE
...``), ``f_R`` is the *highest* firing frequency over the retain set and every protected set: a
latent must be rare on each language kept, not on their pool (monolinguality). Pooling lets a
latent that fires on Hindi, Urdu and Punjabi alike (a shared-vocabulary latent, not a Hindi one)
rank high because English dilutes the retain frequency; the maximum does not. The ``top_n`` latents
with a positive score are selected. With ``grad_attribution`` each latent also gets ``mean_F[a_j *
(W_dec[j] . d log p / d h)]``, where ``log p`` sums the next-token log-probs of the forget text
(GradSAE-style; positive = the latent helps the model predict forget text). Each selected latent's
``n_contexts`` strongest held-out tokens are shown with ``window`` tokens either side, decoded, the
token itself in «».
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import Tensor

from mmie.core.models import LoadedModel
from mmie.core.progress import Progress
from mmie.sae.modules import SparseAutoencoder
from mmie.train_sae.heldout import (  # noqa: F401  (ABLATIONS, heldout_pass: public API here too)
    ABLATIONS,
    FeatureSettings,
    HeldOut,
    heldout_pass,
    measure,
)
from mmie.train_sae.optim import metrics

EPS = 1e-6
ENCODE_BATCH = 4096
METHOD = ("Statistics on held-out tokens. score = selectivity * E_F[a], selectivity = "
          "(f_F - f_R) / (f_F + f_R + 1e-6); f = firing frequency, E[a] = mean activation "
          "(zeros included), F = forget, R = retain (with protected languages: the highest "
          "frequency over retain and each protected set). attr = mean over forget tokens of "
          "a_j * (W_dec[j] . d log p(forget) / d h), when asked for. Contexts: the latent's "
          "strongest held-out tokens, the token in «».")


@dataclass
class Analysis:
    quality: dict[int, dict]
    selected: dict[int, list[int]]
    tensors: dict[str, dict[str, Tensor]]
    files: dict[str, str]


# --------------------------------------------------------------------------- quality
def ce_recovered(clean: float, spliced: float, ablated: float) -> tuple[float | None, str | None]:
    """``(L_ablated - L_sae) / (L_ablated - L_clean)``, or None and why it is undefined."""
    gap = ablated - clean
    if not gap > EPS:
        return None, (f"ablating the layer does not raise the loss (clean {clean:.4g}, "
                      f"ablated {ablated:.4g})")
    return (ablated - spliced) / gap, None


def _ce(sets: dict[str, HeldOut], i: int, missing: dict, prefix: str = "") -> dict:
    n = sum(h.n_loss for h in sets.values())
    if n == 0:
        missing[f"{prefix}ce_recovered"] = "no held-out token predicts a next token"
        return {"ce_recovered": None}
    mean = {v: sum(h.nll[v] for h in sets.values()) / n
            for v in ("clean", f"sae:{i}", f"ablated:{i}")}
    value, reason = ce_recovered(mean["clean"], mean[f"sae:{i}"], mean[f"ablated:{i}"])
    if reason:
        missing[f"{prefix}ce_recovered"] = reason
    return {"ce_clean": mean["clean"], "ce_sae": mean[f"sae:{i}"],
            "ce_ablated": mean[f"ablated:{i}"], "ce_recovered": value}


def _sae_metrics(sae: SparseAutoencoder, x: Tensor, missing: dict, prefix: str = "") -> dict:
    try:
        return metrics(sae, x.to(sae.W_enc.device))
    except ValueError as exc:  # mmie.sae.modules refuses empty or constant inputs with a ValueError
        missing[f"{prefix}fvu"] = str(exc)
        return {"fvu": None, "explained_variance": None, "mean_l0": None}


def quality(i: int, sae: SparseAutoencoder, held: dict[str, HeldOut], stats: dict,
            ablation: str) -> dict:
    missing: dict[str, str] = {}
    x_all = torch.cat([h.acts[i] for h in held.values()])
    q = {"n_tokens": int(x_all.shape[0]), "ablation": ablation,
         **_sae_metrics(sae, x_all, missing), **_ce(held, i, missing),
         "dead_fraction": float(sae.dead_mask().float().mean()),
         "never_fired_heldout": float((stats["freq_all"] == 0).float().mean())}
    q["by_set"] = {name: {**{k: v for k, v in _sae_metrics(sae, h.acts[i], missing,
                                                           f"{name}.").items()
                             if k in ("fvu", "mean_l0")},
                          **_ce({name: h}, i, missing, f"{name}."), "n_tokens": h.acts[i].shape[0]}
                   for name, h in held.items()}
    q["missing"] = missing
    return q


# --------------------------------------------------------------------------- latents
def _encoded(sae: SparseAutoencoder, x: Tensor):
    for start in range(0, x.shape[0], ENCODE_BATCH):
        vals, idx = sae.encode(x[start:start + ENCODE_BATCH].to(sae.W_enc.device))
        yield start, vals.cpu(), idx.cpu()


def latent_stats(sae: SparseAutoencoder, held: dict[str, HeldOut], i: int) -> dict[str, Tensor]:
    """``freq_<set>``, ``mean_<set>`` per latent (see the module docstring), and ``freq_all``."""
    n, stats, total = sae.cfg.n_latents, {}, torch.zeros(sae.cfg.n_latents)
    for name, h in held.items():
        counts, sums = torch.zeros(n), torch.zeros(n)
        for _, vals, idx in _encoded(sae, h.acts[i]):
            fired = vals > 0
            counts.index_add_(0, idx[fired], torch.ones(int(fired.sum())))
            sums.index_add_(0, idx[fired], vals[fired].float())
        m = max(h.acts[i].shape[0], 1)
        stats[f"freq_{name}"], stats[f"mean_{name}"] = counts / m, sums / m
        total += counts
    stats["freq_all"] = total / max(sum(h.acts[i].shape[0] for h in held.values()), 1)
    return stats


def selectivity(freq_forget: Tensor, freq_retain: Tensor) -> Tensor:
    return (freq_forget - freq_retain) / (freq_forget + freq_retain + EPS)


def freq_against(stats: dict[str, Tensor], against: tuple[str, ...]) -> Tensor:
    """Per latent, the highest firing frequency over the ``against`` sets (see the docstring)."""
    return torch.stack([stats[f"freq_{name}"] for name in against]).amax(dim=0)


def latent_scores(stats: dict[str, Tensor], against: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """``(selectivity, score)`` per latent, selectivity taken against ``against``."""
    sel = selectivity(stats["freq_forget"], freq_against(stats, against))
    return sel, sel * stats["mean_forget"]


def select(score: Tensor, top_n: int) -> list[int]:
    values, ids = score.topk(min(top_n, score.numel()))
    return [int(j) for v, j in zip(values, ids, strict=True) if v > 0]


def _dense_selected(sae: SparseAutoencoder, x: Tensor, latents: list[int]) -> Tensor:
    """Activations of just the ``latents`` on every token of ``x``: ``[tokens, len(latents)]``."""
    column = torch.full((sae.cfg.n_latents,), -1, dtype=torch.long)
    column[latents] = torch.arange(len(latents))
    dense = torch.zeros(x.shape[0], len(latents))
    for start, vals, idx in _encoded(sae, x):
        col = column[idx]
        ok = (col >= 0) & (vals > 0)
        rows = torch.arange(start, start + idx.shape[0])[:, None].expand_as(idx)
        dense[rows[ok], col[ok]] = vals[ok].float()
    return dense


def _whole_chars(tokenizer, ids: list[int], start: int, end: int) -> tuple[int, int]:
    """Widen ``[start, end)`` by up to 3 tokens a side until it decodes without U+FFFD.

    Byte-level tokenizers split a Devanagari character over several tokens; a lone piece
    decodes to replacement characters, which would make the report unreadable.
    """
    for _ in range(3):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
        if "\ufffd" not in text:
            break
        start, end = max(0, start - (text[:1] == "\ufffd")), min(len(ids), end + 1)
    return start, end


def render_context(tokenizer, ids: list[int], pos: int, window: int) -> tuple[str, str]:
    """The token at ``pos`` (widened to whole characters) and its window, the token in «»."""
    def text(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=True)

    start, end = _whole_chars(tokenizer, ids, pos, pos + 1)
    left, _ = _whole_chars(tokenizer, ids, max(0, start - window), start)
    _, right = _whole_chars(tokenizer, ids, end, min(len(ids), end + window))
    token = text(start, end)
    return token, f"{text(left, start)}«{token}»{text(end, right)}"


def contexts(sae, held: dict[str, HeldOut], i: int, latents: list[int], tokenizer,
             s: FeatureSettings) -> dict[int, list[dict]]:
    if not latents:
        return {}
    names = list(held)
    dense = torch.cat([_dense_selected(sae, held[n].acts[i], latents) for n in names])
    origin = torch.cat([torch.full((held[n].acts[i].shape[0],), k) for k, n in enumerate(names)])
    where = torch.cat([held[n].where for n in names])
    values, rows = dense.topk(min(s.n_contexts, dense.shape[0]), dim=0)
    out = {}
    for col, latent in enumerate(latents):
        out[latent] = []
        for value, row in zip(values[:, col].tolist(), rows[:, col].tolist(), strict=True):
            if value <= 0:
                break
            name, (text, pos) = names[int(origin[row])], where[row].tolist()
            token, window = render_context(tokenizer, held[name].ids[text], pos, s.window)
            out[latent].append({"set": name, "text": text, "position": pos,
                                "activation": value, "token": token, "context": window})
    return out


# --------------------------------------------------------------------------- report
def _rows(stats: dict[str, Tensor], against: tuple[str, ...], latents: list[int],
          attr: Tensor | None, ctx: dict[int, list[dict]]) -> list[dict]:
    sel, score = latent_scores(stats, against)
    other = freq_against(stats, against)
    return [{"rank": rank, "latent": j, "score": float(score[j]), "selectivity": float(sel[j]),
             "freq_forget": float(stats["freq_forget"][j]),
             "freq_retain": float(stats["freq_retain"][j]), "freq_against": float(other[j]),
             "freq_protected": {name: float(stats[f"freq_{name}"][j])
                                for name in against if name != "retain"},
             "mean_forget": float(stats["mean_forget"][j]),
             "mean_retain": float(stats["mean_retain"][j]),
             "attribution": None if attr is None else float(attr[j]),
             "contexts": ctx.get(j, [])} for rank, j in enumerate(latents, start=1)]


def _md_cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def render_md(report: dict) -> str:
    lines = ["# SAE forget-language features", "", report["method"], ""]
    for layer, body in report["layers"].items():
        q = body["quality"]
        lines += [f"## Layer {layer}", "",
                  f"FVU {_fmt(q.get('fvu'))}, mean L0 {_fmt(q.get('mean_l0'))}, dead "
                  f"{_fmt(q.get('dead_fraction'))}, CE recovered {_fmt(q.get('ce_recovered'))}",
                  "", "| rank | latent | score | selectivity | freq F | freq R (max) | mean F "
                  "| attr |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['latent']} | {_fmt(r['score'])} | "
                  f"{_fmt(r['selectivity'])} | {_fmt(r['freq_forget'])} | "
                  f"{_fmt(r['freq_against'])} | {_fmt(r['mean_forget'])} | "
                  f"{_fmt(r['attribution'])} |" for r in body["features"]]
        if not body["features"]:
            lines.append("\nNo latent fires more on forget than on retain (or protected) text.")
        for r in body["features"]:
            lines += ["", f"### latent {r['latent']}", ""]
            lines += [f"- {c['set']} {c['activation']:.3g}: `{_md_cell(c['context'])}`"
                      for c in r["contexts"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


# --------------------------------------------------------------------------- entry point
@torch.no_grad()
def analyse(lm: LoadedModel, saes: dict[int, SparseAutoencoder], means: dict[int, Tensor],
            heldout: dict[str, list[str]], s: FeatureSettings, progress: Progress
            ) -> Analysis | None:
    """Quality, latent statistics, selected forget latents and the features report.

    Under a launcher every process must call this; rank 0 gets the Analysis, the others None.
    """
    for sae in saes.values():
        sae.eval()  # BatchTopK codes with its learned threshold at inference
    measured = measure(lm, saes, means, heldout, s, progress)
    if measured is None:
        return None
    held, attr = measured
    report = {"method": METHOD, "ablation": s.ablation, "layers": {}, "against": list(s.against),
              "n_tokens": {name: int(h.where.shape[0]) for name, h in held.items()}}
    quality_, selected, tensors = {}, {}, {}
    for i, sae in saes.items():
        stats = latent_stats(sae, held, i)
        _, score = latent_scores(stats, s.against)
        quality_[i] = quality(i, sae, held, stats, s.ablation)
        selected[i] = select(score, s.top_n)
        ctx = contexts(sae, held, i, selected[i], lm.tokenizer, s)
        rows = _rows(stats, s.against, selected[i], attr.get(i), ctx)
        report["layers"][str(i)] = {"quality": quality_[i], "features": rows}
        extra = {"score": score, **({"attribution": attr[i]} if i in attr else {})}
        tensors.update({f"L{i}.{k}": v for k, v in {**stats, **extra}.items()})
    files = {"features.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n",
             "features.md": render_md(report)}
    return Analysis(quality_, selected, {"features": tensors}, files)
