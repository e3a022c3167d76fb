"""Language token sets and the probability mass a model puts on them: a continuous,
forward-only measure of which language a model is ready to write.

For every text of a prompt set the held-out continuation (the part of the sentence after the
prompt) is fed teacher-forced, in one forward pass without generation, and at every
continuation position the model's next-token distribution is summed over a language's token
set; a text's mass is the mean over its positions. Unlike the LID rate of a handful of greedy
continuations (a 0/1 outcome per prompt), this moves smoothly as unlearning progresses, so a
small drop is visible at small n. It follows the "probability of the target language" view of
language confusion in Marchisio et al. 2024 ("Understanding and Mitigating Language Confusion
in LLMs"), measured here on the full next-token distribution rather than on sampled text.

**Token sets** (:func:`build_token_sets`), from the tokenizer and the data:

1. *Script.* Every vocabulary entry is decoded on its own; it belongs to a script when at least
   ``min_share`` of its letters are in that script (:func:`mmie.lid.detect.script_shares`). Entries
   with no letters (punctuation, digits, spaces, byte pieces that are not whole characters)
   and special or control tokens (``<unused0>``, ``[multimodal]``) belong to no set.
2. *Frequency*, between languages that share a script (Hindi/Marathi in Devanagari, Urdu/
   Persian in Arabic script, English/romanized Hindi in Latin): each language's texts are
   tokenized and counted; a script token is dropped from language L when some other
   same-script language M uses it at a higher relative frequency (count / tokens of that
   language's texts). A token unseen in every same-script language's texts stays in all of
   them: the script is then the only evidence. A language alone in its script gets the whole
   script.

A language with no texts (e.g. a replacement language that is not the retain language) gets
its script from :data:`DEFAULT_SCRIPTS`; an unknown one gets no set, and its mass is null.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mmie.core import profile
from mmie.lid.detect import script_of, script_shares

# Script of a language for which no texts were given (any other language gets no token set).
DEFAULT_SCRIPTS = {"en": "Latn", "hi": "Deva", "mr": "Deva", "ne": "Deva", "ur": "Arab",
                   "fa": "Arab", "ar": "Arab", "pa": "Guru", "bn": "Beng", "fr": "Latn",
                   "de": "Latn", "es": "Latn"}


@dataclass(frozen=True)
class LangData:
    """What a token set is built from: the language's script (None: the texts' dominant
    script) and its texts (may be empty)."""

    texts: tuple[str, ...] = ()
    script: str | None = None

    def resolved_script(self, lang: str) -> str | None:
        if self.script:
            return self.script
        if self.texts:
            return script_of(" ".join(self.texts[:200]))
        return DEFAULT_SCRIPTS.get(lang.split("-")[0]) if "-" not in lang else None


@dataclass(frozen=True)
class TokenSet:
    """One language's vocabulary ids, with what it was built from."""

    lang: str
    script: str
    ids: tuple[int, ...]
    data_tokens: int

    def summary(self) -> dict:
        """Manifest record: size and a hash of the sorted ids (the ids go in a file)."""
        digest = hashlib.sha256(",".join(map(str, self.ids)).encode()).hexdigest()
        return {"script": self.script, "size": len(self.ids), "sha256": digest,
                "data_tokens": self.data_tokens}


# Control tokens by their look ("<unused0>", "<start_of_turn>", "[multimodal]"): letters, but
# never text in any language.
_CONTROL = re.compile(r"^\s*(<[^<>\s]+>|\[[^\[\]\s]+\])\s*$")


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(getattr(tokenizer, "all_special_ids", ()) or ()) | {
        int(i) for i, tok in added.items() if getattr(tok, "special", False)}


def token_scripts(tokenizer, min_share: float = 0.5) -> list[str | None]:
    """Script of each vocabulary id's decoded text (None: no letters, no majority, or a
    special / control token)."""
    n = len(tokenizer)
    special = _special_ids(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    out: list[str | None] = []
    for i, text in enumerate(texts):
        shares = {} if i in special or _CONTROL.match(text) else script_shares(text)
        best = max(shares, key=shares.__getitem__) if shares else None
        out.append(best if best is not None and shares[best] >= min_share else None)
    return out


def _frequencies(tokenizer, texts: Sequence[str]) -> tuple[Counter, int]:
    if not texts:
        return Counter(), 0
    counts = Counter(i for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]
                     for i in ids)
    return counts, sum(counts.values())


def _kept(token: int, own: tuple[Counter, int], rivals: list[tuple[Counter, int]]) -> bool:
    """False when a same-script rival uses ``token`` at a higher relative frequency."""
    counts, total = own
    mine = counts[token] / total if total else 0.0
    return all(c[token] == 0 or c[token] / t <= mine for c, t in rivals)


def build_token_sets(tokenizer, langs: Mapping[str, LangData],
                     min_share: float = 0.5) -> dict[str, TokenSet]:
    """Token set per language (module docstring); languages with no known script are left
    out."""
    scripts = token_scripts(tokenizer, min_share)
    resolved = {lang: data.resolved_script(lang) for lang, data in langs.items()}
    freqs = {lang: _frequencies(tokenizer, data.texts) for lang, data in langs.items()}
    out = {}
    for lang, script in resolved.items():
        if script is None:
            continue
        rivals = [freqs[m] for m, s in resolved.items()
                  if m != lang and s == script and freqs[m][1]]
        ids = tuple(i for i, s in enumerate(scripts)
                    if s == script and _kept(i, freqs[lang], rivals))
        out[lang] = TokenSet(lang, script, ids, freqs[lang][1])
    return out


def subset_log_mass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass on ``ids`` at each row of log-probabilities ``[P, V]``;
    -inf for an empty set."""
    if ids.numel() == 0:
        return torch.full(logp.shape[:1], float("-inf"), device=logp.device)
    return logp.index_select(-1, ids.to(logp.device)).logsumexp(-1)


def continuation_start(tokenizer, prompt: str, rest: str,
                       max_length: int) -> tuple[tuple[int, ...], int] | None:
    """Token ids of ``prompt + ' ' + rest`` (truncated) and the first continuation position:
    where they leave the prompt's own tokens. None when no continuation token remains."""
    whole = tokenizer(f"{prompt} {rest}", truncation=True, max_length=max_length)["input_ids"]
    alone = tokenizer(prompt)["input_ids"]
    start = 0
    while start < min(len(whole), len(alone)) and whole[start] == alone[start]:
        start += 1
    start = max(1, start)
    return (tuple(whole), start) if start < len(whole) else None


# --- the forward pass -------------------------------------------------------------------------

@dataclass(frozen=True)
class MassScores:
    """Mean probability mass per language over one text's continuation positions."""

    n_tokens: int
    mass: tuple[float | None, ...]


def _membership(id_sets: list[torch.Tensor], vocab: int, device) -> torch.Tensor:
    """``[V, K]`` float 0/1: column k marks the ids of set k."""
    member = torch.zeros((vocab, len(id_sets)), device=device)
    for k, ids in enumerate(id_sets):
        member[ids.to(device), k] = 1.0
    return member


def _position_masses(hidden: torch.Tensor, lm, id_sets: list[torch.Tensor],
                     chunk: int) -> torch.Tensor:
    """``[P, K]`` probability mass on each of the K id sets, ``chunk`` positions at a time:
    the unnormalised probabilities ``exp(logit - max)`` in place in the logit buffer, then one
    ``[chunk, V] x [V, K]`` product with the sets' 0/1 membership, over their sum. Every
    position's distribution is read twice (the max, the exponential), not once per set."""
    from mmie.core.head_precision import LogitBuffer
    from mmie.core.models import lm_head, unwrap

    softcap = getattr(unwrap(lm.model).config.get_text_config(), "final_logit_softcapping", None)
    logits_of = LogitBuffer(lm_head(lm.model), softcap)  # one buffer for every chunk
    out, member = [torch.empty(0, len(id_sets))], None
    for start in range(0, hidden.shape[0], chunk):
        # under head_precision("bf16"): bf16 product, each row's largest logits exact
        logits = logits_of(hidden[start:start + chunk])
        if member is None:
            member = _membership(id_sets, logits.shape[-1], logits.device)
        probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        out.append((probs @ member / probs.sum(-1, keepdim=True)).cpu())
    return torch.cat(out)


@torch.inference_mode()
def _mass_batch(lm, items: Sequence, id_sets: list[torch.Tensor],
                chunk: int) -> list[MassScores]:
    from mmie.core.generation import scored_hidden

    hidden, _, target = scored_hidden(lm, items)
    masses = _position_masses(hidden[target.to(hidden.device)], lm, id_sets, chunk)
    counts = target.sum(1).tolist()
    return [MassScores(n, tuple(m.mean(0).tolist()) if n else (None,) * len(id_sets))
            for n, m in zip(counts, masses.split(counts), strict=True)]


@profile.phase("mass")
def mass_scores(lm, items: Sequence, id_sets: list[Sequence[int]], *, batch_size: int = 16,
                chunk_tokens: int = 128, progress=None, desc: str = "mass",
                here=None) -> list[MassScores]:
    """Per item (a :class:`mmie.core.generation.ScoreItem`: positions ``>= start`` are the
    continuation) the mean mass on each id set, in input order; batches shared among launched
    processes as :func:`mmie.core.generation.score` shares them."""
    from mmie.core.progress import SILENT
    from mmie.core.sharded import length_batches, map_batches

    sets = [torch.tensor(sorted(s), dtype=torch.long) for s in id_sets]
    plan = length_batches([len(item.ids) for item in items], batch_size)
    return map_batches(plan, lambda _, chunk: _mass_batch(lm, [items[i] for i in chunk], sets,
                                                           chunk_tokens),
                       len(items), here=here, progress=progress or SILENT, desc=desc)
