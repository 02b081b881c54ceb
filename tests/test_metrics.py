"""Each benchmark metric of eval.py against values worked out by hand (ties, several captions per image)."""

import math

import pytest
import torch

from evaluation.benchmarks import SUGARCREPE
from evaluation.metrics import (
    group_means,
    itt_correct,
    pairwise_correct,
    retrieval_recall,
    topk_accuracy,
    tot_correct,
    zeroshot_classifier,
)


def test_sugarcrepe_rule_a_tie_is_wrong():
    pos = torch.tensor([0.5, 0.6, 0.3, -0.1])
    neg = torch.tensor([0.5, 0.2, 0.4, -0.2])
    assert pairwise_correct(pos, neg).tolist() == [False, True, False, True]


def test_itt_needs_both_positives_above_the_negative():
    i_p1 = torch.tensor([0.5, 0.5, 0.2, 0.4])
    i_p2 = torch.tensor([0.6, 0.3, 0.9, 0.4])
    i_n = torch.tensor([0.4, 0.4, 0.3, 0.4])
    # 0: both above; 1: P2 below N; 2: P1 below N; 3: all tied -> wrong
    assert itt_correct(i_p1, i_p2, i_n).tolist() == [True, False, False, False]


def test_tot_needs_the_positives_closer_to_each_other_than_to_the_negative():
    p1_p2 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    p1_n = torch.tensor([0.5, 0.7, 0.7, 0.1, 0.6])
    p2_n = torch.tensor([0.5, 0.1, 0.2, 0.6, 0.1])
    # 0, 1: above both; 2: tie with P1-N; 3: tie with P2-N; 4: P1 closer to N
    assert tot_correct(p1_p2, p1_n, p2_n).tolist() == [True, True, False, False, False]


def test_retrieval_with_ties_and_several_captions_per_image():
    #            t0   t1   t2   t3   t4       texts 0, 1 describe image 0; 2, 3 image 1; 4 image 2
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.9, 0.0, 0.2],  # image 0: best own caption t0 (0.9) ties with t2 -> rank 1
            [0.3, 0.2, 0.1, 0.5, 0.4],  # image 1: best own t3 (0.5), nothing else as high -> rank 0
            [0.6, 0.7, 0.8, 0.5, 0.1],  # image 2: own t4 (0.1) is last -> rank 4
        ]
    )
    text_image = torch.tensor([0, 0, 1, 1, 2])
    # text->image ranks (column j against its image): t0 0; t1 2 (0.2, 0.7 >= 0.1); t2 2; t3 1 (tie 0.5 with
    # image 2); t4 2
    r = retrieval_recall(sim, text_image, ks=(1, 2, 5))
    assert (r["i2t-R@1"], r["i2t-R@2"], r["i2t-R@5"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert (r["t2i-R@1"], r["t2i-R@2"], r["t2i-R@5"]) == pytest.approx((1 / 5, 2 / 5, 1.0))
    assert list(r) == ["i2t-R@1", "i2t-R@2", "i2t-R@5", "t2i-R@1", "t2i-R@2", "t2i-R@5"]


def test_retrieval_one_caption_each_against_a_naive_loop():
    torch.manual_seed(0)
    sim = torch.randn(12, 12)
    sim[3, 7] = sim[3, 3]  # a tie
    r = retrieval_recall(sim, torch.arange(12), ks=(1, 5))
    for k in (1, 5):
        i2t = sum(sum(float(sim[i, j] >= sim[i, i]) for j in range(12) if j != i) < k for i in range(12)) / 12
        t2i = sum(sum(float(sim[i, j] >= sim[j, j]) for i in range(12) if i != j) < k for j in range(12)) / 12
        assert r[f"i2t-R@{k}"] == pytest.approx(i2t) and r[f"t2i-R@{k}"] == pytest.approx(t2i)


def test_topk_accuracy_ties_count_against():
    logits = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.1], [0.9, 0.1, 0.0]])
    labels = torch.tensor([2, 0, 0])
    # ranks: 1 (0.5 above), 1 (tie), 0
    acc = topk_accuracy(logits, labels, (1, 2))
    assert (acc[1], acc[2]) == pytest.approx((1 / 3, 1.0))


def test_zeroshot_classifier_normalises_each_prompt_before_averaging():
    prompts = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])  # one class, two templates of different norms
    expect = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)  # averaging unnormalised would give (3, 1) / sqrt(10)
    torch.testing.assert_close(zeroshot_classifier(prompts), expect)


def test_group_means_are_unweighted_over_files_with_summed_counts():
    acc = {
        "add_att": (0.5, 2),
        "add_obj": (1.0, 4),
        "replace_att": (0.0, 1),
        "replace_obj": (0.5, 1),
        "replace_rel": (1.0, 1),
        "swap_att": (0.25, 4),
        "swap_obj": (0.75, 4),
    }
    per_file = {k: {"accuracy": a, "count": n} for k, (a, n) in acc.items()}
    g = group_means(per_file, SUGARCREPE)
    assert g["add"] == {"accuracy": 0.75, "count": 6}
    assert g["replace"] == {"accuracy": 0.5, "count": 3}
    assert g["swap"] == {"accuracy": 0.5, "count": 8}
    assert g["mean"]["accuracy"] == pytest.approx(4 / 7) and g["mean"]["count"] == 17
