"""The checks of the write-it-yourself exercises (docs/exercises.md): each blank patch of exercises/ empties one
function, and these tests fail until the student's version is right, saying what is wrong.

Each check compares the function with its equation written out as a loop, and looks first for the usual mistakes,
so that the message names one (a transposed shape, a flipped sign, a missing normalisation, the softmax over the
wrong axis) instead of printing two tensors. The checks pass on the repository's own code; the tests at the end
feed them known-wrong versions and assert that the message names the mistake.
"""

import pytest
import torch
import torch.nn.functional as F

import concepts
import losses
import pool
from model import VisionConfig, VisionTransformer

# ----------------------------------------------------------------------------- 01: the noun-phrase chunker

# (tagged tokens, the expected spans): tags as NLTK's tagger gives them, written out so the check needs no tagger
CHUNKS = [
    (
        [("a", "DT"), ("small", "JJ"), ("red", "JJ"), ("circle", "NN"), ("left", "NN"), ("of", "IN")]
        + [("a", "DT"), ("blue", "JJ"), ("star", "NN")],
        [(0, 4), (6, 9)],
    ),
    (
        [("two", "CD"), ("dogs", "NNS"), ("and", "CC"), ("a", "DT"), ("cat", "NN"), ("'s", "POS"), ("face", "NN")],
        [(0, 2), (3, 7)],
    ),
    (
        [("a", "DT"), ("tiny", "NN"), ("green", "JJ"), ("circle", "NN"), ("on", "IN"), ("the", "DT"), ("left", "NN")],
        [(0, 4)],
    ),
    ([("the", "DT"), ("left", "JJ"), ("side", "NN"), ("of", "IN"), ("a", "DT"), ("stock", "NN"), ("photo", "NN")], []),
]


def check_chunker(noun_phrase_spans) -> None:
    for tagged, expected in CHUNKS:
        got = noun_phrase_spans(list(tagged))
        pairs = isinstance(got, list) and all(isinstance(s, tuple) and len(s) == 2 for s in got)
        assert pairs, f"noun_phrase_spans must return a list of (start, end) tuples, got {got!r}"
        if got == expected:
            continue
        caption = " ".join(w for w, _ in tagged)
        words = [" ".join(w for w, _ in tagged[a:b]) for a, b in got]
        hint = ""
        if got == [(a, b - 1) for a, b in expected]:
            hint = "; end is exclusive: tagged[start:end] is the whole phrase"
        elif any(tagged[b - 1][0].lower() in concepts.GENERIC for a, b in got if b > a):
            hint = "; strip a phrase's trailing GENERIC words ('left', 'side'), then keep it if it still ends in a noun"
        elif {b - a for a, b in got} <= {b - a for a, b in expected}:  # the right lengths, in the wrong places
            hint = "; count every token, those between the NP subtrees too, to know where each NP starts"
        raise AssertionError(f"'{caption}': expected spans {expected}, got {got} ({words}){hint}")


def test_chunker_finds_every_noun_phrase():
    check_chunker(concepts.noun_phrase_spans)


# ----------------------------------------------------------------------------- 03: L_npc's owner labels


def check_owner_labels(owner_labels) -> None:
    owner, num_images = torch.tensor([0, 0, 1, 2, 2, 2]), 4  # image 3 owns no phrase, and still has a row
    expected = torch.tensor([[1.0 if owner[k] == i else -1.0 for k in range(6)] for i in range(num_images)])
    z = owner_labels(owner, num_images)
    assert isinstance(z, torch.Tensor), f"owner_labels must return a tensor, got {type(z).__name__}"
    if z.shape == (6, num_images):
        raise AssertionError("z has shape (K, B) = (6, 4): transpose it, a row per image i and a column per phrase k")
    assert z.shape == (num_images, 6), (
        f"z must have shape (B, K) = (num_images, len(owner)) = (4, 6), got {tuple(z.shape)}"
    )
    assert z.is_floating_point(), f"z must be float (L_npc multiplies the logits by it), got {z.dtype}"
    values = set(z.unique().tolist())
    assert values != {0.0, 1.0}, (
        "z is +1 or -1, not 1 or 0: L_npc reads log sigmoid(z_ik * logit), a negative flips the sign"
    )
    assert values <= {-1.0, 1.0}, f"z holds only +1 and -1, got the values {sorted(values)}"
    assert not torch.equal(z, -expected), "the sign is flipped: z_ik = +1 where owner[k] == i (image i owns phrase k)"
    assert torch.equal(z, expected), (
        f"z_ik = +1 exactly where owner[k] == i: for owner {owner.tolist()}, expected\n{expected}\ngot\n{z}"
    )


def test_owner_labels():
    check_owner_labels(losses.owner_labels)


# ----------------------------------------------------------------------------- 06: the cross-modal pooling


def pooling_case():
    torch.manual_seed(0)
    phrases = F.normalize(torch.randn(3, 8), dim=-1)  # (K, D)
    patches = F.normalize(torch.randn(2, 5, 8), dim=-1)  # (B, N, D)
    return phrases, patches, 0.5


def weights_by_loop(phrases, patches, tau):
    """a_ijk = softmax_j(u_ij . c_k / tau), one (phrase, image) pair at a time."""
    out = torch.zeros(len(phrases), len(patches), patches.shape[1])  # (K, B, N)
    for k, c in enumerate(phrases):
        for i, u in enumerate(patches):
            scores = torch.tensor([float(u_j @ c) / tau for u_j in u])
            out[k, i] = scores.exp() / scores.exp().sum()
    return out


def check_pooling_weights(pooling_weights) -> None:
    phrases, patches, tau = pooling_case()
    a = pooling_weights(phrases, patches, tau)
    if a.shape == (2, 3, 5):
        raise AssertionError("a has shape (B, K, N) = (2, 3, 5): the order is (K, B, N), phrase, image, patch")
    assert a.shape == (3, 2, 5), f"a must have shape (K, B, N) = (3, 2, 5), got {tuple(a.shape)}"
    sums = a.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
        raise AssertionError(
            "a_ijk is a softmax over the N patches (the last axis): for each phrase and image the weights sum to 1, "
            f"yours sum to {sums.flatten().tolist()}"
        )
    logits = torch.einsum("kd,bnd->kbn", phrases, patches)  # (K, B, N)
    if torch.allclose(a, (logits * tau).softmax(-1), atol=1e-5) or torch.allclose(a, logits.softmax(-1), atol=1e-5):
        raise AssertionError("divide the logits u_ij . c_k by tau: a smaller tau must make the weights sharper")
    expected = weights_by_loop(phrases, patches, tau)
    assert torch.allclose(a, expected, atol=1e-5), (
        f"a_ijk = softmax_j(u_ij . c_k / tau): expected\n{expected}\ngot\n{a}"
    )


def check_cross_modal_pool(cross_modal_pool) -> None:
    phrases, patches, tau = pooling_case()
    v = cross_modal_pool(phrases, patches, tau)
    assert v.shape == (3, 2, 8), f"v must have shape (K, B, D) = (3, 2, 8), got {tuple(v.shape)}"
    norms = v.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-5):
        raise AssertionError(
            f"v_ik = normalise(sum_j a_ijk u_ij) has length 1 (F.normalize), yours {norms.flatten().tolist()}"
        )
    a = weights_by_loop(phrases, patches, tau)
    expected = torch.zeros(3, 2, 8)
    for k in range(3):
        for i in range(2):
            w = sum(a[k, i, j] * patches[i, j] for j in range(5))
            expected[k, i] = w / w.norm()
    mean = F.normalize(patches.mean(1), dim=-1).expand(3, 2, 8)
    if torch.allclose(v, mean, atol=1e-5):
        raise AssertionError("v_ik is a plain mean of the patches: weight each patch u_ij by a_ijk (pooling_weights)")
    assert torch.allclose(v, expected, atol=1e-5), f"v_ik = normalise(sum_j a_ijk u_ij): expected\n{expected}\ngot\n{v}"


def test_pooling_weights():
    check_pooling_weights(pool.pooling_weights)


def test_cross_modal_pool():
    check_cross_modal_pool(pool.cross_modal_pool)


# ----------------------------------------------------------------------------- 11: the patch embedding


def patch_case(pooling: str):
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=16, patch_size=4, width=8, layers=1, heads=2, pooling=pooling)
    return VisionTransformer(cfg, embed_dim=8), torch.randn(2, 3, 16, 16)  # (B, C, S, S)


def patches_by_loop(vit, images) -> torch.Tensor:
    """Token n = r * (S/P) + c: patch (r, c)'s C P P pixels times the (W, C P P) weight matrix, plus the bias."""
    P, grid = vit.patchify.kernel_size[0], images.shape[-1] // vit.patchify.kernel_size[0]
    weight = vit.patchify.weight.reshape(len(vit.patchify.weight), -1)  # (W, C P P)
    bias = vit.patchify.bias if vit.patchify.bias is not None else 0
    tokens = [
        images[:, :, r * P : (r + 1) * P, c * P : (c + 1) * P].reshape(len(images), -1) @ weight.T + bias
        for r in range(grid)
        for c in range(grid)
    ]
    return torch.stack(tokens, 1)  # (B, N, W)


def check_patch_embedding(embed_patches, vit, images) -> None:
    with torch.no_grad():
        x, expected = embed_patches(images), patches_by_loop(vit, images)
    if x.shape == (2, 8, 4, 4):
        raise AssertionError("x has shape (B, W, S/P, S/P): flatten the grid into N tokens and put the width last")
    if x.shape == (2, 8, 16):
        raise AssertionError("x has shape (B, W, N): transpose it to (B, N, W), a token of width W per patch")
    assert x.shape == (2, 16, 8), f"x must have shape (B, N, W) = (2, 16, 8), got {tuple(x.shape)}"
    column_major = expected.view(2, 4, 4, 8).transpose(1, 2).reshape(2, 16, 8)
    if torch.allclose(x, column_major, atol=1e-5):
        raise AssertionError("the patches go row by row: token n = r * (S/P) + c; yours go column by column")
    assert torch.allclose(x, expected, atol=1e-5), (
        "token n must be patch (r, c) = divmod(n, S/P) through the linear map"
    )


@pytest.mark.parametrize("pooling", ["cls", "map"])  # "map" (SigLIP's) has a bias on the patch embedding
def test_patch_embedding(pooling):
    vit, images = patch_case(pooling)
    check_patch_embedding(vit.embed_patches, vit, images)


# ----------------------------------------------------------------------------- the checks name the mistake


def _conv_grid(vit, images):
    return vit.patchify(images)  # (B, W, S/P, S/P)


def _weights(phrases, patches, tau):
    return (torch.einsum("kd,bnd->kbn", phrases, patches) / tau).softmax(-1)  # (K, B, N)


def _owner_full(owner, num_images):
    return (owner[None, :] == torch.arange(num_images)[:, None]).float() * 2 - 1  # (B, K)


WRONG = [
    (check_owner_labels, lambda o, n: _owner_full(o, n).T, "transpose"),
    (check_owner_labels, lambda o, n: (_owner_full(o, n) > 0).float(), "not 1 or 0"),
    (check_owner_labels, lambda o, n: -_owner_full(o, n), "sign is flipped"),
    (check_owner_labels, lambda o, n: _owner_full(o, int(o.max()) + 1), "(B, K)"),
    (check_owner_labels, lambda o, n: _owner_full(o, n) > 0, "float"),
    (check_pooling_weights, lambda c, u, tau: torch.einsum("kd,bnd->kbn", c, u).softmax(1), "over the N patches"),
    (check_pooling_weights, lambda c, u, tau: (torch.einsum("kd,bnd->kbn", c, u) * tau).softmax(-1), "tau"),
    (check_pooling_weights, lambda c, u, tau: torch.einsum("kd,bnd->bkn", c, u).softmax(-1), "(K, B, N)"),
    (
        check_cross_modal_pool,
        lambda c, u, tau: torch.einsum("kbn,bnd->kbd", _weights(c, u, tau), u),
        "length 1",
    ),
    (check_cross_modal_pool, lambda c, u, tau: F.normalize(u.mean(1), dim=-1).expand(len(c), -1, -1), "plain mean"),
]


@pytest.mark.parametrize("check, wrong, says", WRONG, ids=[f"{c.__name__}-{s}" for c, _, s in WRONG])
def test_a_wrong_answer_is_told_what_is_wrong(check, wrong, says):
    with pytest.raises(AssertionError) as failure:
        check(wrong)
    assert says in str(failure.value), str(failure.value)


def test_a_wrong_patch_embedding_is_told_what_is_wrong():
    vit, images = patch_case("cls")
    wrong = {
        "flatten the grid": lambda x: _conv_grid(vit, x),
        "transpose it to (B, N, W)": lambda x: _conv_grid(vit, x).flatten(2),
        "column by column": lambda x: _conv_grid(vit, x).transpose(2, 3).flatten(2).transpose(1, 2),
    }
    for says, embed in wrong.items():
        with pytest.raises(AssertionError) as failure:
            check_patch_embedding(embed, vit, images)
        assert says in str(failure.value), str(failure.value)


def spans_with_a_mistake(tagged, count_between=True, strip_generic=True) -> list[tuple[int, int]]:
    """noun_phrase_spans as a student might write it, with one of two mistakes."""
    spans, pos = [], 0
    for node in concepts._chunker.parse(tagged):
        if not hasattr(node, "label"):  # a (word, tag) pair between the NP subtrees
            pos += count_between
            continue
        start, end = pos, pos + len(node)
        pos = end
        while strip_generic and end > start and tagged[end - 1][0].lower() in concepts.GENERIC:
            end -= 1
        if end > start and tagged[end - 1][1].startswith("NN"):
            spans.append((start, end))
    return spans


def test_a_wrong_chunker_is_told_what_is_wrong():
    wrong = {
        "exclusive": lambda tagged: [(a, b - 1) for a, b in spans_with_a_mistake(tagged)],
        "GENERIC": lambda tagged: spans_with_a_mistake(tagged, strip_generic=False),
        "count every token": lambda tagged: spans_with_a_mistake(tagged, count_between=False),
    }
    for says, spans_of in wrong.items():
        with pytest.raises(AssertionError) as failure:
            check_chunker(spans_of)
        assert says in str(failure.value), str(failure.value)
    assert spans_with_a_mistake(CHUNKS[0][0]) == CHUNKS[0][1]  # without a mistake, the helper is right
