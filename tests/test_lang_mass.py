"""Language token sets (hand-made tokenizer, hand-checked sets) and the mass measure (hand-set
log-probabilities; tiny:llama for the batched pass)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mmie.core.generation import ScoreItem
from mmie.core.models import ModelSpec, lm_head, loaded
from mmie.evaluate.mass import mass_metrics, mass_rows
from mmie.lid.mass import (
    LangData,
    MassScores,
    TokenSet,
    _position_masses,
    build_token_sets,
    continuation_start,
    mass_scores,
    subset_log_mass,
    token_scripts,
)

VOCAB = ["<pad>", "<bos>", "<unused0>", "[multimodal]", "नमस्ते", "आहे", "है", "घर", "hello",
         "hai", "سلام", "123", "!"]


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>")


def ids_of(*tokens: str) -> tuple[int, ...]:
    return tuple(sorted(VOCAB.index(t) for t in tokens))


def test_token_scripts_ignore_specials_digits_and_punctuation(word_tokenizer):
    scripts = token_scripts(word_tokenizer)
    assert scripts == [None, None, None, None, "Deva", "Deva", "Deva", "Deva", "Latn", "Latn",
                       "Arab", None, None]


def test_same_script_languages_split_tokens_by_relative_frequency(word_tokenizer):
    langs = {"hi": LangData(("है नमस्ते है",)),           # है 2/3, नमस्ते 1/3
             "mr": LangData(("आहे आहे है",)),             # आहे 2/3, है 1/3
             "en": LangData(("hello hello",)),
             "hi-Latn": LangData(("hai",), "Latn"),
             "ur": LangData(),                            # no texts: script from the table
             "xx": LangData()}                            # unknown: no set
    sets = build_token_sets(word_tokenizer, langs)
    assert set(sets) == {"hi", "mr", "en", "hi-Latn", "ur"}
    # घर is in nobody's texts: the script alone decides, so both Devanagari languages keep it
    assert sets["hi"].ids == ids_of("नमस्ते", "है", "घर")
    assert sets["mr"].ids == ids_of("आहे", "घर")
    assert sets["en"].ids == ids_of("hello")
    assert sets["hi-Latn"].ids == ids_of("hai")
    assert sets["ur"].ids == ids_of("سلام") and sets["ur"].script == "Arab"
    assert (sets["hi"].data_tokens, sets["ur"].data_tokens) == (3, 0)


def test_a_language_alone_in_its_script_gets_the_whole_script(word_tokenizer):
    sets = build_token_sets(word_tokenizer, {"hi": LangData(("है",)), "en": LangData(("hai",))})
    assert sets["hi"].ids == ids_of("नमस्ते", "आहे", "है", "घर")
    assert sets["en"].ids == ids_of("hello", "hai")


def test_summary_hashes_the_sorted_ids():
    a, b = TokenSet("hi", "Deva", (2, 4), 3), TokenSet("hi", "Deva", (2, 5), 3)
    assert a.summary()["size"] == 2 and len(a.summary()["sha256"]) == 64
    assert a.summary()["sha256"] != b.summary()["sha256"]


def test_subset_mass_on_hand_set_probabilities():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.5, 0.0]])
    logp = probs.log()
    got = subset_log_mass(logp, torch.tensor([1, 3])).exp()
    assert got.tolist() == pytest.approx([0.6, 0.25])
    assert subset_log_mass(logp, torch.tensor([], dtype=torch.long)).exp().tolist() == [0, 0]


def _identity_lm(vocab: int, softcap=None):
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(
        final_logit_softcapping=softcap))
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=config)
    return SimpleNamespace(model=model)


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_position_masses_through_an_identity_head(chunk):
    # hidden = logits; an identity head gives the softmax of these hand-set rows
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.5, 0.0]])
    hidden = probs.clamp_min(1e-30).log() + 3.0       # log-softmax ignores the shift
    sets = [torch.tensor([0, 1]), torch.tensor([3]), torch.tensor([], dtype=torch.long)]
    got = _position_masses(hidden, _identity_lm(4), sets, chunk)
    assert got.shape == (3, 3)
    assert got[:, 0].tolist() == pytest.approx([0.3, 0.8, 0.5])
    assert got[:, 1].tolist() == pytest.approx([0.4, 0.1, 0.0], abs=1e-6)
    assert got[:, 2].tolist() == [0.0, 0.0, 0.0]


def test_position_masses_apply_the_logit_softcap():
    hidden = torch.tensor([[60.0, 0.0]])
    got = _position_masses(hidden, _identity_lm(2, softcap=30.0), [torch.tensor([1])], 8)
    capped = 30 * math.tanh(2.0)
    assert got.item() == pytest.approx(1 / (1 + math.exp(capped)), rel=1e-5)


def test_continuation_start_marks_the_held_out_tokens():
    from mmie.core.tiny import build_tokenizer

    tok = build_tokenizer()
    ids, start = continuation_start(tok, "ab cd", "ef", max_length=64)
    assert tok.decode(ids[start:]) == " ef"
    assert continuation_start(tok, "ab cd", "ef", max_length=start) is None


@pytest.fixture(scope="module")
def tiny_llama():
    torch.set_num_threads(1)
    with loaded(ModelSpec(name="tiny:llama", device="cpu")) as lm:
        yield lm


def test_masses_of_a_partition_sum_to_one_and_ignore_padding(tiny_llama):
    tok = tiny_llama.tokenizer
    vocab = lm_head(tiny_llama.model).out_features      # the head may be wider than len(tok)
    texts = [("ab cd", "ef gh ij"), ("hello there", "x"), ("a b", "long tail of words here")]
    items = [ScoreItem(*continuation_start(tok, p, r, 64)) for p, r in texts]
    half = list(range(0, vocab, 2))
    rest = list(range(1, vocab, 2))
    together = mass_scores(tiny_llama, items, [half, rest], batch_size=3)
    for got, item in zip(together, items, strict=True):
        assert got.n_tokens == len(item.ids) - item.start
        assert sum(got.mass) == pytest.approx(1.0, abs=1e-5)
    alone = [mass_scores(tiny_llama, [it], [half, rest], batch_size=1)[0] for it in items]
    for a, b in zip(alone, together, strict=True):
        assert a.mass == pytest.approx(b.mass, abs=1e-5)


def test_mass_rows_follow_the_contract_and_null_missing_sets():
    sets = {"hi": TokenSet("hi", "Deva", (1,), 1), "en": TokenSet("en", "Latn", (2,), 1)}
    scores = [MassScores(4, (0.5, 0.5, 0.25)), MassScores(2, (0.1, 0.1, 0.75))]
    rows = mass_rows("forget", [0, 3], scores, ("hi", "hi", "en"), sets)
    assert rows[1] == {"set": "forget", "idx": 3, "n_tokens": 2, "forget_mass": 0.1,
                       "own_mass": 0.1, "replacement_mass": 0.75}
    mixed = mass_rows("mixed", [0], scores[:1], ("hi", None, "en"), sets)
    assert mixed[0]["own_mass"] is None
    metrics = mass_metrics(rows + mixed)
    assert metrics["mass.forget.forget"].value == pytest.approx(0.3)
    assert metrics["mass.forget.replacement"].n == 2
    assert metrics["mass.mixed.own"].value is None and metrics["mass.mixed.own"].missing
