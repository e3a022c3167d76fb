"""Chunked LM losses against naive full-vocabulary computations and hand-computed values."""

import math
import weakref

import pytest
import torch

from mmie.core import losses

B, T, D, V = 3, 5, 8, 50


def _naive_logits(hidden, weight, bias=None, softcap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _naive_logprobs(hidden, weight, labels, mask, bias=None, softcap=None):
    logp = _naive_logits(hidden, weight, bias, softcap).log_softmax(-1)
    return logp.gather(-1, labels[..., None])[..., 0] * mask


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[2, :4] = False
    return hidden, weight, bias, labels, mask


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_token_logprobs_match_naive(batch, softcap, chunk_size):
    hidden, weight, bias, labels, mask = batch
    got = losses.token_logprobs(
        hidden, weight, labels, mask, chunk_size, softcap=softcap, bias=bias
    )
    want = _naive_logprobs(hidden, weight, labels, mask, bias, softcap)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got[~mask] == 0).all()
    assert (got[mask] < 0).all()


def test_token_logprobs_fp32_matches_naive(batch):
    hidden, weight, _, labels, mask = (t.float() if t.is_floating_point() else t for t in batch)
    got = losses.token_logprobs(hidden, weight, labels, mask, 3, softcap=30.0)
    want = _naive_logprobs(hidden, weight, labels, mask, softcap=30.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_head", [False, True])  # eager-gradient vs checkpoint path
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_token_logprobs_gradients_match_naive(batch, softcap, train_head):
    hidden, weight, bias, labels, mask = batch
    upstream = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(fn):
        leaves = [hidden.clone().requires_grad_(True)]
        leaves += [t.clone().requires_grad_(train_head) for t in (weight, bias)]
        (fn(*leaves) * upstream).sum().backward()
        return [leaf.grad for leaf in leaves]

    got = grads(
        lambda h, w, b: losses.token_logprobs(h, w, labels, mask, 2, softcap=softcap, bias=b)
    )
    want = grads(lambda h, w, b: _naive_logprobs(h, w, labels, mask, b, softcap))
    assert (got[1] is not None) == train_head
    for g, w in zip(got, want, strict=True):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-8)
    assert (got[0][~mask] == 0).all()  # padding gets no gradient


def test_gradient_flows_through_a_model_parameter(batch):
    """Hidden states produced by a trainable layer: the eager path feeds its parameters."""
    hidden, weight, _, labels, mask = batch
    layer = torch.nn.Linear(D, D, dtype=torch.float64)
    losses.sequence_nll(layer(hidden), weight, labels, mask).sum().backward()
    got = layer.weight.grad.clone()
    layer.zero_grad()
    naive = -_naive_logprobs(layer(hidden), weight, labels, mask).sum(-1) / mask.sum(-1)
    naive.sum().backward()
    torch.testing.assert_close(got, layer.weight.grad)


@pytest.mark.parametrize("train_head", [False, True])
def test_backward_does_not_keep_full_logits(batch, train_head):
    """Between forward and backward the graph holds nothing of size [tokens, vocab]."""
    hidden, weight, _, labels, mask = batch
    weight = weight.repeat(20, 1).requires_grad_(train_head)  # V = 1000 dwarfs the rest
    hidden = hidden.clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = losses.token_logprobs(hidden, weight, labels % 1000, mask, 2)
    held = [r() for r in saved if r() is not None]
    held = [t.numel() for t in held if t.data_ptr() != weight.data_ptr()]
    assert held and max(held) < weight.shape[0]  # not even one chunk of logits is kept
    out.sum().backward()
    assert hidden.grad.abs().sum() > 0
    assert (weight.grad is not None) == train_head


def test_sequence_logprobs_and_nll(batch):
    hidden, weight, _, labels, mask = batch
    token = _naive_logprobs(hidden, weight, labels, mask)
    total, count = losses.sequence_logprobs(hidden, weight, labels, mask)
    torch.testing.assert_close(total, token.sum(-1))
    assert count.tolist() == [3.0, 5.0, 1.0]
    mean = losses.sequence_nll(hidden, weight, labels, mask)
    torch.testing.assert_close(mean, -token.sum(-1) / count)
    summed = losses.sequence_nll(hidden, weight, labels, mask, reduction="sum")
    torch.testing.assert_close(summed, -token.sum(-1))
    with pytest.raises(ValueError, match="mean"):
        losses.sequence_nll(hidden, weight, labels, mask, reduction="max")


def test_all_padding_sequence_has_zero_nll(batch):
    hidden, weight, _, labels, mask = batch
    mask[1] = False
    nll = losses.sequence_nll(hidden, weight, labels, mask)
    assert nll[1] == 0 and torch.isfinite(nll).all()


def test_shift_labels_left_padding():
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels, mask = losses.shift_labels(ids, attn)
    assert labels.tolist() == [[0, 7, 8, 9, 0], [2, 3, 4, 5, 0]]
    assert mask.int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 0]]


def test_masked_mean_refuses_all_padding():
    values = torch.tensor([[1.0, 3.0]])
    assert losses.masked_mean(values, torch.tensor([[True, False]])) == 1.0
    with pytest.raises(ValueError, match="no tokens"):
        losses.masked_mean(values, torch.zeros(1, 2, dtype=torch.bool))


def _naive_kl(student_h, ref_h, weight, mask, softcap=None):
    s = _naive_logits(student_h, weight, softcap=softcap).log_softmax(-1)
    r = _naive_logits(ref_h, weight, softcap=softcap).log_softmax(-1)
    return (r.exp() * (r - s)).sum(-1) * mask


@pytest.fixture
def pair(batch):
    hidden, weight, _, _, mask = batch
    student = hidden + 0.5 * torch.randn(
        hidden.shape, generator=torch.Generator().manual_seed(2), dtype=hidden.dtype
    )
    return student, hidden, weight, mask


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_full_kl_matches_naive(pair, softcap):
    student, ref, weight, mask = pair
    got = losses.full_kl(student, ref, weight, mask, 3, softcap=softcap)
    torch.testing.assert_close(got, _naive_kl(student, ref, weight, mask, softcap))


def test_ref_topk_targets(pair):
    _, ref, weight, mask = pair
    idx, logp, tail = losses.ref_topk(ref, weight, 4, mask, 3)
    full = _naive_logits(ref, weight).log_softmax(-1)
    want_logp, want_idx = full.topk(4, dim=-1)
    assert torch.equal(idx[mask], want_idx[mask])
    torch.testing.assert_close(logp[mask], want_logp[mask])
    want_tail = full.sort(-1, descending=True).values[..., 4:].logsumexp(-1)
    torch.testing.assert_close(tail[mask], want_tail[mask])
    assert idx.dtype == torch.int64 and (logp[~mask] == 0).all()
    with pytest.raises(ValueError, match="vocabulary"):
        losses.ref_topk(ref, weight, V + 1, mask)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_topk_kl_with_full_vocabulary_is_exact(pair, softcap):
    student, ref, weight, mask = pair
    targets = losses.ref_topk(ref, weight, V, mask, softcap=softcap)
    assert torch.isneginf(targets[2][mask]).all()
    s = student.clone().requires_grad_(True)
    got = losses.topk_kl(s, weight, *targets, mask, 2, softcap=softcap)
    want = losses.full_kl(student, ref, weight, mask, softcap=softcap)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_topk_kl_gradient_matches_naive_coarse_kl(pair):
    student, ref, weight, mask = pair
    targets = losses.ref_topk(ref, weight, 5, mask)
    s1 = student.clone().requires_grad_(True)
    losses.topk_kl(s1, weight, *targets, mask, 2).sum().backward()
    s2 = student.clone().requires_grad_(True)
    idx, ref_logp, ref_tail = targets
    q = _naive_logits(s2, weight).log_softmax(-1)
    q_k = q.gather(-1, idx)
    q_tail = torch.log1p(-q_k.exp().sum(-1))
    kl = (ref_logp.exp() * (ref_logp - q_k)).sum(-1) + ref_tail.exp() * (ref_tail - q_tail)
    (kl * mask).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_kl_is_a_nonnegative_lower_bound(pair, k):
    student, ref, weight, mask = pair
    targets = losses.ref_topk(ref, weight, k, mask)
    approx = losses.topk_kl(student, weight, *targets, mask)
    exact = losses.full_kl(student, ref, weight, mask)
    assert (approx[mask] > 0).all()
    assert (approx <= exact + 1e-12).all()
    same = losses.topk_kl(ref, weight, *targets, mask)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-12)


def _logit_batch(probs):
    """Identity head: hidden = log p makes softmax(hidden @ I) = p exactly."""
    hidden = torch.tensor(probs, dtype=torch.float64).log()[None, None]
    return hidden, torch.eye(len(probs), dtype=torch.float64)


def test_tail_bucket_exact_when_student_tail_is_proportional():
    # top-2 ids {0, 1}; the tail {2, 3} has mass 0.2 (ref) vs 0.4 (student), split 1:1 in both
    ref, eye = _logit_batch([0.5, 0.3, 0.1, 0.1])
    student, _ = _logit_batch([0.3, 0.3, 0.2, 0.2])
    targets = losses.ref_topk(ref, eye, 2)
    assert targets[0][0, 0].tolist() == [0, 1]
    assert math.isclose(targets[2].exp().item(), 0.2, rel_tol=1e-12)
    by_hand = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.3) + 0.2 * math.log(0.2 / 0.4)
    got = losses.topk_kl(student, eye, *targets).item()
    assert math.isclose(got, by_hand, rel_tol=1e-12)
    assert math.isclose(losses.full_kl(student, ref, eye).item(), by_hand, rel_tol=1e-12)
    without_tail = 0.5 * math.log(0.5 / 0.3)
    assert not math.isclose(got, without_tail, rel_tol=1e-3)


def test_tail_bucket_coarsens_when_not_proportional():
    ref, eye = _logit_batch([0.5, 0.3, 0.1, 0.1])
    student, _ = _logit_batch([0.3, 0.3, 0.35, 0.05])
    got = losses.topk_kl(student, eye, *losses.ref_topk(ref, eye, 2)).item()
    by_hand = 0.5 * math.log(0.5 / 0.3) + 0.2 * math.log(0.2 / 0.4)
    assert math.isclose(got, by_hand, rel_tol=1e-12)
    assert got < losses.full_kl(student, ref, eye).item()


def test_head_params_reads_softcap_and_bias():
    class Config:
        final_logit_softcapping = 30.0

        def get_text_config(self):
            return self

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(D, V)
            self.config = Config()

        def get_output_embeddings(self):
            return self.head

    params = losses.head_params(Model())
    assert params["softcap"] == 30.0 and params["bias"].shape == (V,)
    assert params["lm_head_weight"].shape == (V, D)


def test_mask_shape_mismatch_is_refused(batch):
    hidden, weight, _, labels, mask = batch
    with pytest.raises(ValueError, match="mask shape"):
        losses.token_logprobs(hidden, weight, labels, mask[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        losses.token_logprobs(hidden, weight, labels, mask, 0)


def test_softcap_matches_real_gemma2_head():
    """The softcap path reproduces a real HF head that applies final_logit_softcapping."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    labels, mask = losses.shift_labels(ids)
    got = losses.token_logprobs(
        out.hidden_states[-1], labels=labels, mask=mask, **losses.head_params(model)
    )
    want = out.logits.float().log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert out.logits.abs().max() <= 2.0
