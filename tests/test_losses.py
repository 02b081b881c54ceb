"""Each loss against a naive double loop over paper.md's equations, and values derivable by hand; the baselines'
losses and the study's label rules (baselines/losses.py) too."""

import math

import torch
import torch.nn.functional as F

from baselines.losses import clip_loss, concept_labels
from baselines.objectives import ConceptLogitsCLIP, study_loss
from fixtures import step_args
from losses import c2lip_loss, npc_loss, owner_labels, sig_loss, xac_loss
from model import CLIPConfig


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def naive_sigmoid(scores, positive, t, b, count):
    """-(1/count) sum_i sum_k log sigmoid(z_ik (t s_ik + b)), one term at a time."""
    total = 0.0
    for i in range(len(scores)):
        for k in range(len(scores[0])):
            z = 1.0 if positive(i, k) else -1.0
            total += log_sigmoid(z * (t * float(scores[i][k]) + b))
    return -total / count


def random_batch(B=4, K=9, N=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    y = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    c = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    u = F.normalize(torch.randn(B, N, D, generator=g), dim=-1)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])[:K]
    return x, y, c, u, owner


T, BIAS = torch.tensor(7.0), torch.tensor(-3.0)


def test_sig_loss_matches_loop():
    x, y, *_ = random_batch()
    expect = naive_sigmoid(x @ y.T, lambda i, j: i == j, 7.0, -3.0, len(x))
    assert math.isclose(sig_loss(x, y, T, BIAS).item(), expect, rel_tol=1e-5)


def test_sig_loss_at_init_by_hand():
    # orthogonal embeddings: every logit is b = -10, so each of the B positives costs -log sigmoid(-10)
    # and each of the B(B-1) negatives -log sigmoid(10); divided by B.
    e = torch.eye(8)
    loss = sig_loss(e[:4], e[4:], torch.tensor(10.0), torch.tensor(-10.0))
    expect = -(log_sigmoid(-10) + 3 * log_sigmoid(10))
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
    # -log sigmoid(-10) = 10 + log(1 + e^-10) and -log sigmoid(10) = log(1 + e^-10): about b, 10.00018
    assert math.isclose(loss.item(), 10 + 4 * math.log1p(math.exp(-10)), rel_tol=1e-6)


def test_clip_loss_matches_loop():
    x, y, *_ = random_batch()
    s = (7.0 * x @ y.T).tolist()
    B = len(s)
    i2t = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(B))) for i in range(B)) / B
    t2i = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(B))) for j in range(B)) / B
    assert math.isclose(clip_loss(x, y, T).item(), (i2t + t2i) / 2, rel_tol=1e-5)


def test_clip_loss_uniform_is_log_b():
    x = torch.zeros(6, 4)
    assert math.isclose(clip_loss(x, x, T).item(), math.log(6), rel_tol=1e-6)


def test_npc_loss_matches_loop_owner_labels():
    x, _, c, _, owner = random_batch()
    expect = naive_sigmoid(x @ c.T, lambda i, k: owner[k] == i, 7.0, -3.0, len(c))
    assert math.isclose(npc_loss(x, c, owner_labels(owner, len(x)), T, BIAS).item(), expect, rel_tol=1e-5)


def test_npc_loss_matches_loop_phrase_labels():
    x, _, c, _, owner = random_batch()
    ids = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 5])  # phrase 0 is owned by images 0, 1 and 3
    owned = {(int(o), int(p)) for o, p in zip(owner, ids)}
    expect = naive_sigmoid(x @ c.T, lambda i, k: (i, int(ids[k])) in owned, 7.0, -3.0, len(c))
    labels = concept_labels("phrase", owner, len(x), {"phrase_ids": ids})
    assert math.isclose(npc_loss(x, c, labels, T, BIAS).item(), expect, rel_tol=1e-5)


def test_phrase_ids_may_be_any_integers():
    """Ids are compared, not used as indices: 64-bit hashes (as the distributed collate makes) work."""
    owner = torch.tensor([0, 1, 1, 2])
    small, hashed = torch.tensor([0, 1, 0, 2]), torch.tensor([-(2**62), 7 * 10**17, -(2**62), 5])
    assert concept_labels("phrase", owner, 3, {"phrase_ids": hashed}).equal(
        concept_labels("phrase", owner, 3, {"phrase_ids": small})
    )


def test_labels_owner_vs_phrase():
    owner, ids = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 0, 2])
    assert owner_labels(owner, 3).tolist() == [[1, -1, -1, -1], [-1, 1, 1, -1], [-1, -1, -1, 1]]
    assert concept_labels("owner", owner, 3, {}).equal(owner_labels(owner, 3))
    # phrase 0 (columns 0 and 2) belongs to images 0 and 1: both are positives for both columns
    assert concept_labels("phrase", owner, 3, {"phrase_ids": ids}).tolist() == [
        [1, -1, 1, -1],
        [1, 1, 1, -1],
        [-1, -1, -1, 1],
    ]


def naive_pooled_scores(c, u, tau):
    """cos(v_ik, c_k) with v_ik image i's patches pooled by phrase k, one pair at a time -> B lists of K."""
    scores = [[0.0] * len(c) for _ in range(len(u))]
    for i in range(len(u)):
        for k in range(len(c)):
            a = torch.softmax(u[i] @ c[k] / tau, dim=0)  # (N,)
            v = (a[:, None] * u[i]).sum(0)
            scores[i][k] = float(v @ c[k] / v.norm())
    return scores


def test_xac_loss_matches_loop():
    x, _, c, u, owner = random_batch()
    for tau in (1.0, 0.2):
        scores = naive_pooled_scores(c, u, tau)
        expect = naive_sigmoid(scores, lambda i, k: owner[k] == i, 7.0, -3.0, len(c))
        got = xac_loss(u, c, owner_labels(owner, len(u)), T, BIAS, tau).item()
        assert math.isclose(got, expect, rel_tol=1e-5)


def test_losses_backpropagate_to_embeddings_scale_and_bias():
    x, y, c, u, owner = random_batch()
    t, b = torch.tensor(7.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    u = u.clone().requires_grad_()
    z = owner_labels(owner, len(x))
    loss = sig_loss(x, y, t, b) + npc_loss(x, c, z, t, b) + xac_loss(u, c, z, t, b)
    loss.backward()
    assert t.grad is not None and b.grad is not None and u.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the total, c2lip_loss


def naive_terms(x, y, c, u, owner, t=7.0, b=-3.0, concept_t=None, concept_b=None, tau=1.0, ids=None):
    """The three unweighted terms by the loops above; the concept terms at (concept_t, concept_b) if given."""
    ct, cb = (t, b) if concept_t is None else (concept_t, concept_b)
    if ids is None:
        positive = lambda i, k: owner[k] == i
    else:
        owned = {(int(o), int(p)) for o, p in zip(owner, ids)}
        positive = lambda i, k: (i, int(ids[k])) in owned
    return {
        "L_sig": naive_sigmoid(x @ y.T, lambda i, j: i == j, t, b, len(x)),
        "L_npc": naive_sigmoid(x @ c.T, positive, ct, cb, len(c)),
        "L_xac": naive_sigmoid(naive_pooled_scores(c, u, tau), positive, ct, cb, len(c)),
    }


def check_terms(got: dict, expect: dict) -> None:
    assert set(got) == set(expect)
    for name, value in expect.items():
        assert math.isclose(got[name].item(), value, rel_tol=1e-5), name


def test_c2lip_loss_is_the_weighted_sum_paper_weights():
    """The paper's L = L_sig + 1.0 L_npc + 0.01 L_xac at tau = 1, its defaults; the terms come back unweighted."""
    x, y, c, u, owner = random_batch()
    total, terms = c2lip_loss(x, y, c, u, owner, T, BIAS)
    expect = naive_terms(x, y, c, u, owner)
    check_terms(terms, expect)
    assert math.isclose(total.item(), expect["L_sig"] + expect["L_npc"] + 0.01 * expect["L_xac"], rel_tol=1e-5)


def test_c2lip_loss_is_the_weighted_sum_other_weights_and_tau():
    x, y, c, u, owner = random_batch(seed=3)
    for npc_weight, xac_weight, tau in ((0.3, 2.0, 0.2), (2.5, 0.5, 0.5)):
        kw = {"npc_weight": npc_weight, "xac_weight": xac_weight, "tau": tau}
        total, terms = c2lip_loss(x, y, c, u, owner, T, BIAS, **kw)
        expect = naive_terms(x, y, c, u, owner, tau=tau)
        check_terms(terms, expect)
        weighted = expect["L_sig"] + npc_weight * expect["L_npc"] + xac_weight * expect["L_xac"]
        assert math.isclose(total.item(), weighted, rel_tol=1e-5), kw


def test_c2lip_loss_weight_zero_leaves_the_term_out():
    x, y, c, u, owner = random_batch()
    expect = naive_terms(x, y, c, u, owner)
    total, terms = c2lip_loss(x, y, c, u, owner, T, BIAS, npc_weight=0.0, xac_weight=0.5)
    check_terms(terms, {k: expect[k] for k in ("L_sig", "L_xac")})
    assert math.isclose(total.item(), expect["L_sig"] + 0.5 * expect["L_xac"], rel_tol=1e-5)
    # xac_weight 0: L_xac is not even computed, so no patch embeddings are needed
    total, terms = c2lip_loss(x, y, c, None, owner, T, BIAS, xac_weight=0.0)
    check_terms(terms, {k: expect[k] for k in ("L_sig", "L_npc")})
    assert math.isclose(total.item(), expect["L_sig"] + expect["L_npc"], rel_tol=1e-5)
    total, terms = c2lip_loss(x, y, c, None, owner, T, BIAS, npc_weight=0, xac_weight=0)
    check_terms(terms, {"L_sig": expect["L_sig"]})
    assert math.isclose(total.item(), expect["L_sig"], rel_tol=1e-5)  # SigLIP's loss alone


def study_model(t: float, b: float, concept_t: float, concept_b: float) -> ConceptLogitsCLIP:
    """A model of the study's --concept-logits own, whose two logit pairs are (t, b) and (concept_t, concept_b)."""
    model = ConceptLogitsCLIP(CLIPConfig())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(t)), model.logit_bias.fill_(b)
        model.concept_logit_scale.fill_(math.log(concept_t)), model.concept_logit_bias.fill_(concept_b)
    return model


def test_the_studys_loss_reads_its_label_rule_and_its_own_concept_logits_in_the_concept_terms_only():
    """baselines/objectives.py study_loss: the three terms of c2lip_loss with --concept-labels phrase (both concept
    terms read the labels) and --concept-logits own (the caption term at (7, -3), the concept terms at (4, -1.5))."""
    x, y, c, u, owner = random_batch(seed=1)
    ids = torch.tensor([0, 1, 2, 0, 3, 1, 4, 0, 5])
    model = study_model(7.0, -3.0, 4.0, -1.5)
    args = step_args("c2lip", "--concept-labels", "phrase", "--concept-logits", "own", "--xac-weight", "0.2")
    emb = {"image": x, "text": y, "phrase": c, "patch": u, "owner": owner, "phrase_ids": ids}
    total, terms = study_loss(model, emb, args)
    expect = naive_terms(x, y, c, u, owner, concept_t=4.0, concept_b=-1.5, ids=ids)
    check_terms(terms, expect)
    assert math.isclose(total.item(), expect["L_sig"] + expect["L_npc"] + 0.2 * expect["L_xac"], rel_tol=1e-5)
    pairs = [model.logit_scale, model.logit_bias, model.concept_logit_scale, model.concept_logit_bias]
    caption_grads = torch.autograd.grad(terms["L_sig"], pairs, retain_graph=True, allow_unused=True)
    assert caption_grads[0] is not None and caption_grads[1] is not None and caption_grads[2:] == (None, None)
    concept_grads = torch.autograd.grad(terms["L_npc"] + terms["L_xac"], pairs, allow_unused=True)
    assert concept_grads[:2] == (None, None) and concept_grads[2] is not None and concept_grads[3] is not None


def test_scene_labels_keep_the_owner_of_a_phrase_that_names_no_object():
    """--concept-labels scene: a caption without a phrase is its own phrase, with codes (-1, -1, -1) that describe
    no object; its image still owns it (+1), and no other image holds it (-1)."""
    owner = torch.tensor([0, 1, 1])
    codes = torch.tensor([[0, 0, -1], [-1, -1, -1], [1, 1, -1]])  # (colour, shape, size): phrase 1 says nothing
    objects = torch.tensor([[[0, 0, 0], [-1, -1, -1]], [[1, 1, 2], [0, 0, 1]]])  # image 1 also holds colour 0 shape 0
    z = concept_labels("scene", owner, 2, {"phrase_codes": codes, "objects": objects})
    assert z.tolist() == [[1, -1, -1], [1, 1, 1]]
