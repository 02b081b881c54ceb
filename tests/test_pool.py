import torch
import torch.nn.functional as F

from pool import cross_modal_pool, pooled_similarity, pooling_weights


def explicit_pool(c, u, tau):
    """v_ik = normalise(sum_j softmax_j(u_ij . c_k / tau) u_ij), one (phrase, image) pair at a time."""
    K, (B, N, D) = len(c), u.shape
    out = torch.empty(K, B, D, dtype=torch.float64)
    for k in range(K):
        for i in range(B):
            scores = [float(u[i, j] @ c[k]) / tau for j in range(N)]
            m = max(scores)
            e = [torch.tensor(s - m, dtype=torch.float64).exp() for s in scores]
            a = [x / sum(e) for x in e]
            v = sum(a[j] * u[i, j].double() for j in range(N))
            out[k, i] = v / v.norm()
    return out


def test_pool_matches_explicit_formula():
    torch.manual_seed(0)
    c = F.normalize(torch.randn(5, 8), dim=-1)
    u = F.normalize(torch.randn(3, 7, 8), dim=-1)
    for tau in (1.0, 0.1):
        got = cross_modal_pool(c, u, tau)
        assert got.shape == (5, 3, 8)
        torch.testing.assert_close(got.double(), explicit_pool(c, u, tau), atol=1e-5, rtol=1e-5)


def test_weights_are_a_softmax_over_patches_and_sharpen_with_tau():
    torch.manual_seed(1)
    c = F.normalize(torch.randn(4, 16), dim=-1)
    u = F.normalize(torch.randn(2, 9, 16), dim=-1)
    flat, sharp = pooling_weights(c, u, 1.0), pooling_weights(c, u, 0.05)
    torch.testing.assert_close(flat.sum(-1), torch.ones(4, 2))
    # unit vectors at tau = 1: logits in [-1, 1], so no weight exceeds e^2 times another
    assert (flat.max(-1).values / flat.min(-1).values).max() <= torch.e**2
    assert sharp.max(-1).values.mean() > flat.max(-1).values.mean()


def test_a_phrase_equal_to_one_patch_picks_it_out_at_low_tau():
    u = torch.eye(6)[None]  # one image, six orthogonal patches
    v = cross_modal_pool(u[0, 2:3], u, tau=0.01)  # the phrase is patch 2
    torch.testing.assert_close(v[0, 0], u[0, 2], atol=1e-4, rtol=0)


def test_pooled_similarity_equals_the_materialised_form_in_value_and_gradient():
    """The Gram-matrix algebra, chunked and checkpointed, gives v_ik . c_k and its gradients to 1e-6."""
    torch.manual_seed(2)
    c0 = F.normalize(torch.randn(37, 32), dim=-1)
    u0 = F.normalize(torch.randn(5, 12, 32), dim=-1)
    for tau in (1.0, 0.1):
        c, u = c0.clone().requires_grad_(), u0.clone().requires_grad_()
        ref = (cross_modal_pool(c, u, tau) * c[:, None, :]).sum(-1)  # (K, B)
        w = torch.randn_like(ref)
        (ref * w).sum().backward()
        ref_grads = c.grad.clone(), u.grad.clone()
        for max_elements in (10**9, 5 * 12 * 4):  # one chunk; ten chunks of 4 phrases, recomputed in backward
            c, u = c0.clone().requires_grad_(), u0.clone().requires_grad_()
            got = pooled_similarity(c, u, tau, max_elements=max_elements)
            torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=0)
            (got * w).sum().backward()
            torch.testing.assert_close(c.grad, ref_grads[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(u.grad, ref_grads[1], atol=1e-5, rtol=1e-5)


def test_chunks_stay_under_the_bound_and_are_recomputed_not_kept(monkeypatch):
    """The memory promise of pooled_similarity: each chunk's (chunk, B, N) tensors hold at most max_elements, and
    with several chunks under autograd none of them is kept for the backward pass (recomputed there instead)."""
    import pool

    K, B, N, D = 12, 3, 5, 8
    c, u = F.normalize(torch.randn(K, D), dim=-1).requires_grad_(), F.normalize(torch.randn(B, N, D), dim=-1)
    real, chunks = pool._similarity_chunk, []
    monkeypatch.setattr(pool, "_similarity_chunk", lambda c, *rest: chunks.append(len(c)) or real(c, *rest))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        s = pooled_similarity(c, u, 0.5, max_elements=4 * B * N)  # three chunks of four phrases
    assert chunks == [4, 4, 4] and s.shape == (K, B)
    assert not [shape for shape in saved if len(shape) == 3 and shape[1:] == (B, N)], saved
    s.sum().backward()
    assert max(chunks) * B * N <= 4 * B * N and len(chunks) == 6  # the backward pass ran each chunk again
