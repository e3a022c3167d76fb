"""Tiny random models (Llama, Qwen2, Gemma 3 shapes) with a tokenizer built locally.

They load in well under a second on a CPU and need no network, so tests and smoke runs use
them (`--model tiny:llama`). Weights are seeded, so a tiny model has a stable fingerprint.
The tokenizer is byte-level with no merges: every script round-trips, nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from mmie.core.errors import ModelError
from mmie.core.identity import config_hash

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
HIDDEN, FFN, LAYERS, HEADS = 32, 64, 4, 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for char in sorted(byte_chars):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                             special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(vocab)))


def _qwen2(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(vocab)))


def _gemma3(vocab: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**{**_common(vocab), "tie_word_embeddings": True},
                              head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    return Gemma3ForCausalLM(config)


TINY: dict[str, Callable] = {"llama": _llama, "qwen2": _qwen2, "gemma3": _gemma3}


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def build_tiny(arch: str, seed: int = 0):
    """(model, tokenizer, fingerprint) for ``tiny:<arch>``; identical on every call."""
    if arch not in TINY:
        raise ModelError(f"unknown tiny model '{arch}' (known: {', '.join(sorted(TINY))})")
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TINY[arch](len(tokenizer) + 4)
    model.config._name_or_path = f"tiny:{arch}"
    return model, tokenizer, {"config_sha256": config_hash(model.config),
                              "weights_sha256": state_hash(model)}
