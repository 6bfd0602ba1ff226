"""OOD detection scores of the fine-tuning application against hand-computed and scikit-learn values."""

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from bayeskern.app.ood import SCORES, ood_metrics, scores


def test_scores_are_one_minus_max_prob_entropy_and_the_given_mutual_information():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    mi = torch.tensor([0.01, 0.3])
    s = scores(probs, mi)
    assert s["max_prob"].tolist() == pytest.approx([0.1, 0.5])
    assert s["entropy"].tolist() == pytest.approx([-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), math.log(2)])
    assert s["mutual_information"].tolist() == pytest.approx([0.01, 0.3])


def test_ood_metrics_on_a_hand_computed_example():
    # max_prob scores in: 0.1, 0.4; out: 0.3, 0.5
    inside = (torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.zeros(2))
    outside = (torch.tensor([[0.7, 0.3], [0.5, 0.5]]), torch.zeros(2))
    report = ood_metrics(inside, outside)
    assert set(report) == set(SCORES)
    # AUROC: 3 of the 4 (out, in) pairs ranked right; AP: recall 1/2 at precision 1, 1 at 2/3;
    # flagging both OOD inputs needs the threshold 0.3, which flags one of the two in-distribution ones
    assert report["max_prob"] == pytest.approx({"auroc": 0.75, "aupr": 0.5 + 0.5 * 2 / 3, "fpr95": 0.5})
    assert report["mutual_information"]["auroc"] == pytest.approx(0.5)  # a point estimate: chance


def test_ood_metrics_agree_with_scikit_learn():
    g = torch.Generator().manual_seed(0)
    probs_in = torch.softmax(3 * torch.randn(50, 4, generator=g), -1)
    probs_out = torch.softmax(torch.randn(30, 4, generator=g), -1)
    mi_in, mi_out = torch.rand(50, generator=g) * 0.2, torch.rand(30, generator=g) * 0.3
    report = ood_metrics((probs_in, mi_in), (probs_out, mi_out))
    labels = [0] * 50 + [1] * 30
    for name in SCORES:
        s = torch.cat([scores(probs_in, mi_in)[name], scores(probs_out, mi_out)[name]]).numpy()
        assert report[name]["auroc"] == pytest.approx(roc_auc_score(labels, s))
        assert report[name]["aupr"] == pytest.approx(average_precision_score(labels, s))
        s_in, s_out = s[:50], s[50:]
        threshold = sorted(s_out, reverse=True)[math.ceil(0.95 * 30) - 1]  # flags 95% of the OOD inputs
        assert report[name]["fpr95"] == pytest.approx((s_in >= threshold).mean())
