import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

from bayeskern import metrics

# Six examples, three classes; with 5 equal-width bins (0, .2], (.2, .4], ..., (.8, 1]:
#   row  conf  top  target  hit  bin
#   a    .90   0    0       1    4
#   b    .85   1    2       0    4
#   c    .70   0    0       1    3
#   d    .50   1    0       0    2
#   e    .45   2    2       1    2
#   f    .38   0    1       0    1
HAND_PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],
        [0.05, 0.85, 0.10],
        [0.70, 0.20, 0.10],
        [0.30, 0.50, 0.20],
        [0.30, 0.25, 0.45],
        [0.38, 0.34, 0.28],
    ],
    dtype=torch.float64,
)
HAND_TARGETS = torch.tensor([0, 2, 0, 0, 2, 1])
# bin 4: conf (.90 + .85) / 2 = .875, acc 1/2 -> gap .375, weight 2/6
# bin 3: conf .70,                    acc 1   -> gap .300, weight 1/6
# bin 2: conf (.50 + .45) / 2 = .475, acc 1/2 -> gap .025, weight 2/6
# bin 1: conf .38,                    acc 0   -> gap .380, weight 1/6
HAND_ECE = (2 * 0.375 + 0.300 + 2 * 0.025 + 0.380) / 6  # = 0.24667
HAND_MCE = 0.380
HAND_RMSCE = math.sqrt((2 * 0.375**2 + 0.300**2 + 2 * 0.025**2 + 0.380**2) / 6)


def random_problem(seed: int, n: int = 2000, num_classes: int = 7, scale: float = 2.0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, num_classes, generator=generator)
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    return logits, targets


def sample_labels(probs: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)


def test_ece_mce_rmsce_match_hand_computation():
    assert metrics.ece(HAND_PROBS, HAND_TARGETS, n_bins=5) == pytest.approx(HAND_ECE, abs=1e-12)
    assert metrics.mce(HAND_PROBS, HAND_TARGETS, n_bins=5) == pytest.approx(HAND_MCE, abs=1e-12)
    rmsce = metrics.ece(HAND_PROBS, HAND_TARGETS, n_bins=5, norm="l2")
    assert rmsce == pytest.approx(HAND_RMSCE, abs=1e-12)


def test_accuracy_and_error_match_hand_computation():
    # rows a, c and e are right
    assert metrics.accuracy(HAND_PROBS, HAND_TARGETS) == pytest.approx(3 / 6)
    assert metrics.error(HAND_PROBS, HAND_TARGETS) == pytest.approx(3 / 6)


def test_bins_are_right_closed():
    # confidence .5 with two bins falls in (0, .5], confidence .75 in (.5, 1]
    probs = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.5, 0.5]])
    bins = metrics.calibration_bins(probs, torch.tensor([0, 0, 1]), n_bins=2)
    assert bins.count.tolist() == [2.0, 1.0]
    assert bins.accuracy.tolist() == [0.5, 1.0]
    assert bins.confidence.tolist() == [0.5, 0.75]


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_torchmetrics(norm, seed):
    logits, targets = random_problem(seed)
    probs = logits.softmax(1)
    ours = metrics.ece(probs, targets, n_bins=15, norm=norm)
    theirs = multiclass_calibration_error(probs, targets, num_classes=7, n_bins=15, norm=norm)
    assert ours == pytest.approx(theirs.item(), abs=1e-6)


def test_classwise_ece_matches_hand_computation():
    # Two bins (0, .5], (.5, 1]; per class: confidence p_.c against 1[y = c].
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 2, 2, 1])
    # class 0: high {.6 | 1} gap .4 w 1/4; low {.2,.1,.3 | 0,0,0} gap .2 w 3/4 -> .25
    # class 1: high {.7 | 0} gap .7 w 1/4; low {.3,.2,.3 | 0,0,1} gap |1/3 - .8/3| w 3/4 -> .225
    # class 2: high {.7 | 1} gap .3 w 1/4; low {.1,.1,.4 | 0,1,0} gap |1/3 - .2| w 3/4 -> .175
    expected = (0.25 + 0.225 + 0.175) / 3
    assert metrics.classwise_ece(probs, targets, n_bins=2) == pytest.approx(expected, abs=1e-12)


def test_classwise_ece_matches_torchmetrics_binary_per_class():
    logits, targets = random_problem(2, num_classes=5)
    probs = logits.softmax(1)
    per_class = [
        binary_calibration_error(column.contiguous(), (targets == c).long(), n_bins=10)
        for c, column in enumerate(probs.T)
    ]
    expected = torch.stack(per_class).mean().item()
    assert metrics.classwise_ece(probs, targets, n_bins=10) == pytest.approx(expected, abs=1e-6)


def test_adaptive_bins_hold_equal_mass_and_match_sorted_chunks():
    logits, targets = random_problem(3, n=1500)
    probs = logits.softmax(1)
    bins = metrics.calibration_bins(probs, targets, n_bins=15, binning="adaptive")
    assert bins.count.tolist() == [100.0] * 15
    # independent oracle: sort by confidence and cut into 15 chunks of 100
    confidence, prediction = probs.double().max(1)
    order = confidence.argsort()
    chunks = zip(confidence[order].chunk(15), (prediction == targets)[order].double().chunk(15))
    expected = sum(abs(c.mean() - h.mean()).item() * len(c) for c, h in chunks) / 1500
    adaptive = metrics.ece(probs, targets, n_bins=15, binning="adaptive")
    assert adaptive == pytest.approx(expected, abs=1e-12)


def test_calibrated_sampler_has_small_ece_and_sharpened_one_large():
    uniform = torch.rand(40000, 4, generator=torch.Generator().manual_seed(4))
    probs = -uniform.log() / -uniform.log().sum(1, keepdim=True)  # Dirichlet(1, 1, 1, 1)
    targets = sample_labels(probs, seed=5)  # labels drawn from the predicted distribution
    assert metrics.ece(probs, targets) < 0.015
    assert metrics.ece(probs, targets, binning="adaptive") < 0.015
    assert metrics.classwise_ece(probs, targets) < 0.015
    sharpened = probs**3 / (probs**3).sum(1, keepdim=True)
    assert metrics.ece(sharpened, targets) > 0.2


def test_nll_and_brier_match_direct_formulas():
    logits, targets = random_problem(6, n=50, num_classes=4)
    probs = logits.softmax(1).double().numpy()
    y = targets.numpy()
    expected_nll = np.mean([-math.log(probs[i, y[i]]) for i in range(50)])
    expected_brier = np.mean([sum((probs[i, c] - (c == y[i])) ** 2 for c in range(4)) for i in range(50)])
    assert metrics.nll(probs, y) == pytest.approx(expected_nll, rel=1e-12)
    assert metrics.brier(probs, y) == pytest.approx(expected_brier, rel=1e-12)
    from_logits = metrics.nll(logits, targets, from_logits=True)
    assert from_logits == pytest.approx(F.cross_entropy(logits.double(), targets).item())


def test_nll_of_zero_probability_is_finite():
    value = metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert value == pytest.approx(-math.log(torch.finfo(torch.float64).tiny))


def test_numpy_float32_and_torch_float64_inputs_agree():
    logits, targets = random_problem(7, n=300)
    probs32 = logits.softmax(1).numpy()  # float32, rows sum to 1 up to rounding
    from_numpy = metrics.calibration_report(probs32, targets.numpy())
    from_torch = metrics.calibration_report(torch.from_numpy(probs32).double(), targets)
    assert from_numpy == from_torch


def test_calibration_report_agrees_with_each_metric():
    logits, targets = random_problem(8, n=400)
    report = metrics.calibration_report(logits, targets, from_logits=True)
    probs = logits.softmax(1)
    expected = {
        "accuracy": metrics.accuracy(probs, targets),
        "error": metrics.error(probs, targets),
        "nll": metrics.nll(logits, targets, from_logits=True),
        "brier": metrics.brier(probs, targets),
        "ece": metrics.ece(probs, targets),
        "mce": metrics.mce(probs, targets),
        "rmsce": metrics.ece(probs, targets, norm="l2"),
        "ece_adaptive": metrics.ece(probs, targets, binning="adaptive"),
        "classwise_ece": metrics.classwise_ece(probs, targets),
    }
    assert report == pytest.approx(expected, abs=1e-6)


def entropy2(q: float) -> float:
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))


def test_entropies_and_mutual_information_match_hand_computation():
    # example 0: samples [.8, .2], [.4, .6]   -> mean [.6, .4]
    # example 1: samples [1, 0], [0, 1]       -> mean [.5, .5], each sample certain
    # example 2: samples [.5, .5], [.5, .5]   -> mean [.5, .5], samples agree
    samples = torch.tensor(
        [
            [[0.8, 0.2], [1.0, 0.0], [0.5, 0.5]],
            [[0.4, 0.6], [0.0, 1.0], [0.5, 0.5]],
        ]
    )
    total = [entropy2(0.6), math.log(2), math.log(2)]
    aleatoric = [(entropy2(0.8) + entropy2(0.4)) / 2, 0.0, math.log(2)]
    epistemic = [t - a for t, a in zip(total, aleatoric)]
    assert metrics.predictive_entropy(samples).tolist() == pytest.approx(total, abs=1e-7)
    assert metrics.expected_entropy(samples).tolist() == pytest.approx(aleatoric, abs=1e-7)
    assert metrics.mutual_information(samples).tolist() == pytest.approx(epistemic, abs=1e-7)


def test_entropies_from_logits_equal_entropies_from_probs():
    logits = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(9))
    from_logits = metrics.mutual_information(logits, from_logits=True)
    assert torch.allclose(from_logits, metrics.mutual_information(logits.softmax(-1)))


def test_ood_auroc_matches_pair_count():
    # out-of-distribution scores 3.5 and 5 beat 3 and 4 of the 4 in-distribution scores: 7 / 8
    assert metrics.ood_auroc([1.0, 2.0, 3.0, 4.0], [3.5, 5.0]) == pytest.approx(7 / 8)


def test_ood_report_matches_hand_computation():
    # ranked by score: 3 (out), 2 (in), 1 (in), 0 (out)
    # precision at recall 1/2 is 1/1, at recall 1 is 2/4 -> AP = .5 * 1 + .5 * .5 = .75
    # 95% of the outs are caught only at threshold 0, which flags both ins -> FPR 1
    report = metrics.ood_report(np.array([1.0, 2.0]), np.array([3.0, 0.0]))
    assert report == pytest.approx({"auroc": 0.5, "aupr": 0.75, "fpr95": 1.0})


def test_ood_report_gaussian_scores_match_closed_form():
    # in ~ N(0, 1), out ~ N(d, 1): AUROC = Phi(d / sqrt 2); 95% of outs lie above
    # t = d - 1.6449, so FPR95 = P(in > t) = 1 - Phi(d - 1.6449)
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    d, generator = 1.5, torch.Generator().manual_seed(10)
    scores_in = torch.randn(20000, generator=generator)
    scores_out = d + torch.randn(20000, generator=generator)
    report = metrics.ood_report(scores_in, scores_out)
    assert report["auroc"] == pytest.approx(phi(torch.tensor(d / math.sqrt(2))).item(), abs=0.01)
    assert report["fpr95"] == pytest.approx(1 - phi(torch.tensor(d - 1.6449)).item(), abs=0.015)
    assert report["auroc"] == metrics.ood_auroc(scores_in, scores_out)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    logits = 3.0 * torch.randn(20000, 10, generator=torch.Generator().manual_seed(11))
    targets = sample_labels((logits / true_temperature).softmax(1), seed=12)
    fitted = metrics.fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_temperature, rel=0.03)


def test_fit_temperature_on_log_mean_probabilities_of_a_predictive():
    generator = torch.Generator().manual_seed(13)
    sample_logits = 3.0 * torch.randn(20000, 10, generator=generator)
    sample_logits = sample_logits + torch.randn(8, 20000, 10, generator=generator)
    log_mean_probs = sample_logits.softmax(-1).mean(0).log()
    targets = sample_labels((log_mean_probs / 1.5).softmax(1), seed=14)
    fitted = metrics.fit_temperature(log_mean_probs, targets)
    assert fitted == pytest.approx(1.5, rel=0.03)
    row_shift = 5.0 * torch.randn(20000, 1, generator=generator)
    shifted = metrics.fit_temperature(log_mean_probs + row_shift, targets)
    assert shifted == pytest.approx(fitted, rel=1e-4)


def test_fitted_temperature_minimises_nll():
    logits, targets = random_problem(15, n=3000, scale=1.0)
    targets = sample_labels((logits / 0.7).softmax(1), seed=16)
    fitted = metrics.fit_temperature(logits, targets)

    def nll_at(temperature: float) -> float:
        scaled = metrics.apply_temperature(logits, temperature)
        return metrics.nll(scaled, targets, from_logits=True)

    assert nll_at(fitted) < min(nll_at(0.95 * fitted), nll_at(1.05 * fitted), nll_at(1.0))


def test_apply_temperature_divides_logits():
    logits = np.array([[2.0, -1.0]])
    assert metrics.apply_temperature(logits, 4.0).tolist() == [[0.5, -0.25]]


PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
TARGETS = torch.tensor([0, 1, 2, 0])


def with_first_row(row: list[float]) -> torch.Tensor:
    changed = PROBS.clone()
    changed[0] = torch.tensor(row)
    return changed


BAD_INPUTS = {
    "probs ndim": (lambda: metrics.ece(PROBS[0], TARGETS), r"probs must have shape \(N, C\)"),
    "probs empty": (lambda: metrics.nll(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), "probs is empty"),
    "probs nan": (lambda: metrics.brier(with_first_row([math.nan, 0.5, 0.5]), TARGETS), "probs contains NaN or inf"),
    "logits inf": (
        lambda: metrics.nll(with_first_row([math.inf, 0, 0]), TARGETS, from_logits=True),
        "probs contains NaN or inf",
    ),
    "probs sum": (lambda: metrics.accuracy(2 * PROBS, TARGETS), "probs rows must sum to 1"),
    "probs negative": (lambda: metrics.ece(with_first_row([1.2, -0.1, -0.1]), TARGETS), "probs has negative entries"),
    "length": (lambda: metrics.ece(PROBS, TARGETS[:3]), "targets has length 3 but probs has 4 rows"),
    "target high": (lambda: metrics.mce(PROBS, torch.tensor([0, 1, 2, 3])), r"targets must lie in \[0, 3\)"),
    "target negative": (
        lambda: metrics.classwise_ece(PROBS, torch.tensor([0, -1, 2, 0])),
        r"targets must lie in \[0, 3\)",
    ),
    "target float": (lambda: metrics.ece(PROBS, TARGETS.float()), "integer class indices"),
    "target ndim": (lambda: metrics.ece(PROBS, TARGETS[:, None]), r"targets must have shape \(N,\)"),
    "n_bins": (lambda: metrics.ece(PROBS, TARGETS, n_bins=0), "n_bins must be a positive integer"),
    "norm": (lambda: metrics.ece(PROBS, TARGETS, norm="l3"), "norm must be"),
    "binning": (lambda: metrics.ece(PROBS, TARGETS, binning="quantile"), "binning must be"),
    "sample ndim": (lambda: metrics.mutual_information(PROBS), r"sample_probs must have shape \(S, N, C\)"),
    "ood empty": (lambda: metrics.ood_auroc([1.0, 2.0], []), "scores_out is empty"),
    "ood nan": (lambda: metrics.ood_report([1.0, math.nan], [2.0]), "scores_in contains NaN"),
    "temperature length": (
        lambda: metrics.fit_temperature(PROBS, TARGETS[:2]),
        "targets has length 2 but logits has 4 rows",
    ),
    "temperature bounds": (lambda: metrics.fit_temperature(PROBS, TARGETS, bounds=(2.0, 1.0)), "bounds must satisfy"),
    "temperature zero": (lambda: metrics.apply_temperature(PROBS, 0.0), "temperature must be"),
    "temperature nan": (lambda: metrics.apply_temperature(PROBS, math.nan), "temperature must be"),
    "report": (lambda: metrics.calibration_report(PROBS, TARGETS[:3]), "targets has length 3"),
}


@pytest.mark.parametrize(("call", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
