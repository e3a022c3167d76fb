"""A language gate: a linear probe on one block's output that decides, token by token, whether
the text so far is in the forget language, and a causal latch that keeps it on once it fired.

It makes an edit *conditional* (:mod:`mmie.edits.glora`): the edit acts on a sequence from the
first token where the gate fires, and not at all before or on sequences where it never fires,
so on those the model is exactly the base model. This is the guardrail idea of Dynamic SAE
Guardrails (Muhamed et al. 2025, "SAEs can improve unlearning: dynamic sparse autoencoder
guardrails for precision unlearning in LLMs"): intervene only where a classifier on the model's
own activations says the forget domain is present. Here the classifier is a logistic probe, and
the forget domain a language.

**Scores.** With ``h_t`` the output of block ``layer`` at token t, the token score is
``s_t = w . (h_t - mean) / scale + b`` (logistic regression on standardised states, fitted on
token states of positive texts (forget language) against negative ones (every language to keep),
classes weighted equally). BOS and padding get no score.

**Latch.** The window score at t is the mean of ``s`` over the ``window`` tokens ending at t,
defined only when all of them are scored tokens; the gate is 1 from the first t whose window
score exceeds ``threshold`` to the end of the sequence, else 0. A window of a few tokens keeps a
single odd token of a kept language from firing it. The gate at t depends only on tokens <= t, so
decoding with a KV cache gives the gate a single forward pass over the whole text gives (the
latch carries its state from one decoding step to the next).

**Threshold.** A text's score is its highest window score. On the validation texts, with ``n``
the highest negative text's score and ``p`` the lowest positive's: ``(n + p) / 2`` when
``p > n``, else ``n`` (no validation negative fires; some positives then do not either). Either
way the share of validation texts of each set that fire is recorded in the artifact.

**Choice of layer and window.** One probe is fitted per candidate layer, and each is thresholded
at each candidate window; the pair with the widest validation margin ``p - n`` is kept (so the
choice, like the threshold, is made on validation texts; every candidate is recorded). Among
the negatives belong the texts the base model itself writes after prompts in the kept languages
(``mmie data continue``): sentences alone do not show the probe a Bengali answer that carries
Latin-script words, and a gate fitted without them fired on such answers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmie.core.activations import iter_batches
from mmie.core.artifacts import Artifact, load, save
from mmie.core.data import read_texts, split_prompt
from mmie.core.errors import ArtifactError, DataError
from mmie.core.hooks import HookSpec, block_hidden, hooked
from mmie.core.models import LoadedModel, ModelSpec, loaded, unwrap
from mmie.core.progress import SILENT, Progress
from mmie.core.provenance import check_out, file_hash


@dataclass(frozen=True)
class LangGateConfig:
    """How :func:`fit_gate` fits the probe.

    layers: candidate blocks whose output the probe reads (an edit gated by it acts on later
        blocks only).
    windows: candidate numbers of tokens averaged before the threshold (module docstring).
        Every (layer, window) pair is fitted and the one with the widest validation margin
        (lowest positive minus highest negative text score) is kept; all are recorded.
    l2: ridge penalty on the probe weights (standardised features).
    max_length, batch_size: tokens per text and texts per forward pass.
    max_iter: L-BFGS iterations.
    val_prompt_frac: None, or cut each validation *positive* text to its prompt (its first
        ``val_prompt_frac`` of words, as `evaluate` cuts prompts) before scoring it. An edit
        behind the gate can only keep the first answer token from being in the forget language
        if the gate fires within the prompt; scoring whole positive texts lets a gate through
        that fires only halfway into a short prompt's answer.
    """

    layers: tuple[int, ...] = (4, 6, 8)
    windows: tuple[int, ...] = (3, 5)
    l2: float = 1e-3
    max_length: int = 128
    batch_size: int = 16
    max_iter: int = 200
    val_prompt_frac: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
        object.__setattr__(self, "windows", tuple(sorted({int(i) for i in self.windows})))
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"layers must be block indices >= 0, got {self.layers}")
        if not self.windows or min(self.windows) < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")
        if min(self.max_length, self.batch_size, self.max_iter) < 1:
            raise ValueError("max_length, batch_size and max_iter must be >= 1")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")
        if self.val_prompt_frac is not None and not 0 < self.val_prompt_frac < 1:
            raise ValueError(f"val_prompt_frac must be in (0, 1), got {self.val_prompt_frac}")


@dataclass
class LanguageGate:
    """The fitted probe and its decision rule (module docstring)."""

    layer: int
    window: int
    mean: Tensor
    scale: Tensor
    weight: Tensor
    bias: float
    threshold: float

    def token_scores(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` states -> ``[...]`` scores (float32, on the states' device)."""
        x = (hidden.float() - self.mean.to(hidden.device)) / self.scale.to(hidden.device)
        return x @ self.weight.to(hidden.device) + self.bias

    def text_score(self, states: Tensor) -> float:
        """Highest window score of one text's token states ``[n, d]`` (-inf if too short)."""
        scores = self.token_scores(states)
        if len(scores) < self.window:
            return float("-inf")
        return float(scores.unfold(0, self.window, 1).mean(-1).max())

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight,
                "bias": torch.tensor([self.bias]), "threshold": torch.tensor([self.threshold]),
                "layer": torch.tensor([self.layer]), "window": torch.tensor([self.window])}

    @classmethod
    def from_tensors(cls, t: Mapping[str, Tensor], d_model: int, where: str) -> LanguageGate:
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        expected = gate_shapes(d_model)
        if shapes != expected:
            raise ArtifactError(f"{where}: language gate tensors {shapes}, expected {expected}")
        return cls(int(t["layer"][0]), int(t["window"][0]), t["mean"].float(),
                   t["scale"].float(), t["weight"].float(), float(t["bias"][0]),
                   float(t["threshold"][0]))


def gate_shapes(d_model: int) -> dict[str, tuple[int, ...]]:
    return {**{k: (d_model,) for k in ("mean", "scale", "weight")},
            **{k: (1,) for k in ("bias", "threshold", "layer", "window")}}


# --- the latch at run time ---------------------------------------------------------------------

class Latch:
    """Causal gate state of one batch of sequences (module docstring, "Latch")."""

    def __init__(self, gate: LanguageGate) -> None:
        self.gate = gate
        self.tail: Tensor | None = None    # [B, window - 1] last scores (NaN: not scored)
        self.fired: Tensor | None = None   # [B] bool
        self.values: Tensor | None = None  # [B, T] gate of the latest forward pass

    def _fresh(self, batch: int, device: torch.device) -> bool:
        return self.tail is None or self.tail.shape[0] != batch or self.tail.device != device

    def step(self, scores: Tensor, scored: Tensor) -> Tensor:
        """Gate values ``[B, T]`` for the next tokens; a pass of more than one token starts new
        sequences (a prompt or a whole text), a single token continues the last ones."""
        batch, width = scores.shape
        k = self.gate.window
        if width > 1 or self._fresh(batch, scores.device):
            self.tail = scores.new_full((batch, k - 1), float("nan"))
            self.fired = torch.zeros(batch, dtype=torch.bool, device=scores.device)
        seq = torch.cat([self.tail, scores.masked_fill(~scored, float("nan"))], dim=1)
        means = seq.unfold(1, k, 1).mean(-1)  # NaN wherever a window holds an unscored token
        hit = torch.nan_to_num(means, nan=float("-inf")) > self.gate.threshold
        on = torch.cummax(hit.int(), dim=1).values.bool() | self.fired[:, None]
        self.tail, self.fired = seq[:, seq.shape[1] - (k - 1):], on[:, -1]
        self.values = on.float()
        return self.values


@contextmanager
def gate_live(lm: LoadedModel, gate: LanguageGate) -> Iterator[Latch]:
    """Score every forward pass inside the block; ``latch.values`` is the gate of the latest one.

    Two hooks, removed on exit: one on the input embedding records which tokens are real (not
    BOS or padding), one on block ``gate.layer`` turns its output into gate values."""
    if not 0 <= gate.layer < lm.n_layers:
        raise ArtifactError(f"language gate reads block {gate.layer}; "
                            f"{lm.identity.name} has {lm.n_layers}")
    latch, seen = Latch(gate), {}
    skip = {i for i in (lm.tokenizer.bos_token_id, lm.tokenizer.pad_token_id) if i is not None}

    def record_ids(module, args):
        ids = args[0] if args else None
        seen["scored"] = None if ids is None else ~torch.isin(
            ids, torch.tensor(sorted(skip), device=ids.device))

    def on_block(module, args, output):
        hidden = block_hidden(output)
        scored = seen.get("scored")
        if scored is None or scored.shape != hidden.shape[:2]:
            scored = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        with torch.no_grad():
            latch.step(gate.token_scores(hidden.detach()), scored.to(hidden.device))

    embed = unwrap(lm.model).get_input_embeddings()
    with hooked([HookSpec(embed, record_ids, pre=True), HookSpec(lm.blocks[gate.layer],
                                                                 on_block)]):
        yield latch


# --- fitting -----------------------------------------------------------------------------------

def text_states(lm: LoadedModel, texts: Sequence[str], config: LangGateConfig,
                progress: Progress = SILENT, desc: str = "gate states") -> dict[int, list[Tensor]]:
    """Per candidate layer, each text's scored token states ``[n_i, d]``, in input order."""
    got: dict[int, list] = {layer: [None] * len(texts) for layer in config.layers}
    for batch in iter_batches(lm, texts, config.layers, max_length=config.max_length,
                              batch_size=config.batch_size, progress=progress, desc=desc):
        for layer, states in batch.states.items():
            for row, index in enumerate(batch.indices):
                got[layer][int(index)] = states[row][batch.mask[row]]
    return {layer: [g for g in rows if g is not None] for layer, rows in got.items()}


def fit_probe(positive: Tensor, negative: Tensor, config: LangGateConfig
              ) -> tuple[Tensor, Tensor, Tensor, float]:
    """Class-balanced, ridge-penalised logistic regression on standardised token states;
    returns ``(mean, scale, weight, bias)``."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-4)
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], dtype=z.dtype, requires_grad=True)
    b = torch.zeros(1, dtype=z.dtype, requires_grad=True)
    pos_weight = torch.tensor(len(negative) / max(1, len(positive)), dtype=z.dtype)
    opt = torch.optim.LBFGS([w, b], max_iter=config.max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z @ w + b, y, pos_weight=pos_weight) + config.l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean.float(), scale.float(), w.detach().float(), float(b.detach())


def choose_threshold(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The module docstring's rule, from validation text scores of each class."""
    if not positive or not negative:
        raise ValueError("the threshold needs validation texts of both classes")
    top_negative, low_positive = max(negative), min(positive)
    if low_positive > top_negative:
        return (top_negative + low_positive) / 2
    return top_negative


def _states_by_set(lm, sets: Mapping[str, Sequence[str]], config, progress, tag):
    """{layer: {set name: [token states per text]}}."""
    by_set = {name: text_states(lm, texts, config, progress, f"{tag} {name}")
              for name, texts in sets.items()}
    return {layer: {name: got[layer] for name, got in by_set.items()} for layer in config.layers}


def _candidate(layer: int, window: int, probe: tuple, val: dict) -> tuple[LanguageGate, dict]:
    """The gate of one (layer, window) pair with its threshold, and its validation record."""
    gate = LanguageGate(layer, window, *probe, 0.0)
    scores = {cls: {name: [gate.text_score(t) for t in texts] for name, texts in sets.items()}
              for cls, sets in val.items()}
    flat = {cls: [x for v in sets.values() for x in v] for cls, sets in scores.items()}
    gate.threshold = choose_threshold(flat["pos"], flat["neg"])
    fired = {cls: {name: sum(x > gate.threshold for x in v) / len(v) for name, v in sets.items()}
             for cls, sets in scores.items()}
    margin = min(flat["pos"]) - max(flat["neg"])
    return gate, {"layer": layer, "window": window, "threshold": gate.threshold,
                  "margin": margin, "separable": margin > 0, "val_fired": fired}


def fit_gate(lm: LoadedModel, positive: Mapping[str, Sequence[str]],
             negative: Mapping[str, Sequence[str]], val_positive: Mapping[str, Sequence[str]],
             val_negative: Mapping[str, Sequence[str]], config: LangGateConfig = LangGateConfig(),
             progress: Progress = SILENT) -> tuple[LanguageGate, dict]:
    """Fit a probe per candidate layer on the training sets and a threshold per window on the
    validation sets; keep the pair with the widest validation margin. Returns the gate and a
    record: the chosen pair's threshold, margin and share of each validation set that fires,
    and every candidate's."""
    if bad := [i for i in config.layers if not i < lm.n_layers - 1]:
        raise ValueError(f"layers {bad}: a gated edit needs blocks after the gate's "
                         f"({lm.identity.name} has {lm.n_layers})")
    train = {cls: _states_by_set(lm, s, config, progress, "train")
             for cls, s in (("pos", positive), ("neg", negative))}
    val = {cls: _states_by_set(lm, s, config, progress, "val")
           for cls, s in (("pos", val_positive), ("neg", val_negative))}
    candidates = []
    for layer in config.layers:
        flat = {cls: torch.cat([t for texts in train[cls][layer].values() for t in texts])
                for cls in ("pos", "neg")}
        probe = fit_probe(flat["pos"], flat["neg"], config)
        candidates += [_candidate(layer, w, probe, {c: val[c][layer] for c in val})
                       for w in config.windows]
    gate, record = max(candidates, key=lambda c: c[1]["margin"])
    tokens = {cls: {name: sum(len(t) for t in texts) for name, texts in sets[
        config.layers[0]].items()} for cls, sets in train.items()}
    return gate, {**record, "train_tokens": tokens,
                  "candidates": [{k: v for k, v in c[1].items() if k != "val_fired"}
                                 for c in candidates]}


def save_gate(out: Path | str, lm: LoadedModel, gate: LanguageGate, record: dict,
              inputs: Mapping[str, Mapping[str, str]], config: LangGateConfig,
              force: bool = False) -> Artifact:
    """A ``langgate`` artifact: the probe tensors, the settings, the input files and hashes."""
    files = {role: {name: {"path": str(p), "sha256": file_hash(p)} for name, p in sets.items()}
             for role, sets in inputs.items()}
    return save(out, "langgate", tensors={"gate": gate.tensors()},
                config={**asdict(config), "inputs": files}, model=lm.identity,
                metrics=record, force=force)


def load_gate(path: Path | str, lm: LoadedModel) -> tuple[Artifact, LanguageGate]:
    artifact = load(path, kind="langgate", model=lm.identity)
    gate = LanguageGate.from_tensors(artifact.tensors("gate"), lm.identity.d_model,
                                     f"{artifact.path}/gate.safetensors")
    return artifact, gate


ROLES = ("positive", "negative", "val_positive", "val_negative")


def run(model: ModelSpec, inputs: Mapping[str, Mapping[str, str]], out: Path | str,
        config: LangGateConfig = LangGateConfig(), *, field: str = "text", force: bool = False,
        progress: Progress = SILENT) -> Artifact:
    """Read each role's sets (``{role: {name: path}}``, roles :data:`ROLES`, none empty), load
    the model, fit the gate and save a ``langgate`` artifact."""
    if missing := [r for r in ROLES if not inputs.get(r)]:
        raise DataError(f"a language gate needs texts for every role; missing: "
                        f"{', '.join(missing)}")
    texts = {role: {name: read_texts(p, field=field) for name, p in sets.items()}
             for role, sets in inputs.items()}
    if config.val_prompt_frac is not None:  # see LangGateConfig.val_prompt_frac
        texts["val_positive"] = {name: [split_prompt(t, config.val_prompt_frac)[0] for t in ts]
                                 for name, ts in texts["val_positive"].items()}
    check_out(Path(out), [p for sets in inputs.values() for p in sets.values()], force=force)
    with loaded(model) as lm:
        gate, record = fit_gate(lm, texts["positive"], texts["negative"], texts["val_positive"],
                                texts["val_negative"], config, progress)
        return save_gate(out, lm, gate, record, inputs, config, force=force)
