"""The linearised (GLM) predictive, ``bk.predict(posterior, x, pred_type="glm", link_approx=...)``:
against laplace-torch 0.3's GLM probit, against closed forms where the network is linear in its
weights (there the linearisation is the network itself), and the fields each link fills."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import bayeskern as bk

laplace = pytest.importorskip("laplace", reason="laplace-torch is the oracle (pip install '.[test]')")
curvature = pytest.importorskip("laplace.curvature")


def _data(n: int = 40, features: int = 5, classes: int = 3) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, features), torch.randint(0, classes, (n,))), batch_size=16)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("prior_precision", [0.5, 5.0])
def test_probit_equals_laplace_torch(structure, prior_precision):
    net, loader = _mlp(), _data()
    oracle_class = laplace.DiagLaplace if structure == "diag" else laplace.KronLaplace
    oracle = oracle_class(net, "classification", backend=curvature.CurvlinopsEF, prior_precision=prior_precision)
    oracle.fit(loader)
    mine_class = bk.DiagLaplace if structure == "diag" else bk.KronLaplace
    mine = mine_class(net, prior_mean="zero", prior_precision=prior_precision, seed=0).fit(loader, progress=False)
    x = torch.randn(9, 5)
    expected = oracle(x, pred_type="glm", link_approx="probit")
    got = bk.predict(mine, x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(got.probs, expected, rtol=1e-4, atol=1e-5)
    assert got.expected_entropy is None and got.mutual_info is None  # the probit draws no samples
    torch.testing.assert_close(got.entropy, -(got.probs * got.probs.log()).sum(-1))


def test_a_laplace_posterior_predicts_with_the_glm_probit_by_default():
    net, loader = _mlp(), _data()
    la = bk.DiagLaplace(net, seed=0).fit(loader, progress=False)
    x = torch.randn(4, 5)
    assert la.pred_type == "glm"
    torch.testing.assert_close(bk.predict(la, x).probs, bk.predict(la, x, pred_type="glm", link_approx="probit").probs)
    vi = bk.VI(net, num_data=40, seed=0)
    assert vi.pred_type == "nn" and bk.predict(vi, x, num_samples=2, compile=False).mutual_info is not None


def _linear_regression(structure: str, temperature: float = 1.0):
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    x = torch.randn(30, 4)
    y = x @ torch.randn(4, 1) + 0.1 * torch.randn(30, 1)
    cls = bk.DiagLaplace if structure == "diag" else bk.KronLaplace
    la = cls(net, likelihood="regression", noise_std=0.3, prior_precision=2.0, temperature=temperature, seed=0)
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=10), progress=False)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_regression_variance_is_x_sigma_x_plus_noise_for_a_linear_model(structure):
    """f(x, theta) = W x + b is its own linearisation: the predictive is N(W* x + b*, phi^T Sigma phi +
    sigma^2) with phi = (x, 1) and Sigma the posterior covariance, built here from its samples' law."""
    la = _linear_regression(structure, temperature=0.5)
    x = torch.randn(6, 4)
    pred = bk.predict(la, x, pred_type="glm")
    if structure == "diag":
        variances = {n: s.double().square() for n, s in la.std().items()}
        expected = (x.double().square() @ variances["weight"].T).squeeze(-1) + variances["bias"]
    else:
        (g_w, a_w), (g_b, _) = la.factors["weight"], la.factors["bias"]
        # one output: the weight block is g_w * A (1 x 1 kron 4 x 4), the bias block g_b (1 x 1)
        cov_w = la.temperature * torch.linalg.inv(g_w.double() * a_w.double() + la.prior_precision * torch.eye(4))
        cov_b = la.temperature / (g_b.double() + la.prior_precision)
        expected = torch.einsum("ni,ij,nj->n", x.double(), cov_w, x.double()) + cov_b.squeeze()
    torch.testing.assert_close(pred.variance.squeeze(-1).double(), expected + 0.3**2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pred.mean, la.model(x), rtol=1e-6, atol=1e-6)


def test_the_mc_link_of_a_linear_model_is_the_sampled_network():
    """For a model linear in its weights the linearised logits at sample s are the network's at sample s:
    the MC link equals the sampled ("nn") predictive over the same samples, every field."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    la = bk.KronLaplace(net, prior_precision=0.3, seed=2).fit(_data(), progress=False)
    x = torch.randn(7, 5)
    glm = bk.predict(la, x, pred_type="glm", link_approx="mc", num_samples=11, return_logits=True)
    nn_pred = bk.predict(la, x, pred_type="nn", num_samples=11, compile=False, return_logits=True)
    for field in ("probs", "entropy", "expected_entropy", "mutual_info", "logits"):
        torch.testing.assert_close(getattr(glm, field), getattr(nn_pred, field), rtol=1e-5, atol=1e-6)


def test_the_mc_link_converges_to_the_closed_form_regression_variance():
    la = _linear_regression("diag")
    x = torch.randn(5, 4)
    closed = bk.predict(la, x, pred_type="glm")
    sampled = bk.predict(la, x, pred_type="glm", link_approx="mc", num_samples=4000)
    excess = closed.variance - 0.3**2  # the parameter part, which the samples estimate
    torch.testing.assert_close(sampled.variance - 0.3**2, excess, rtol=0.1, atol=0)
    assert (sampled.mean - closed.mean).abs().max() < 4 * excess.sqrt().max() / math.sqrt(4000)


def test_vi_is_gaussian_and_linearises_around_its_mean():
    net = _mlp()
    vi = bk.VI(net, num_data=40, init_std=0.05, seed=0)
    x = torch.randn(6, 5)
    pred = bk.predict(vi, x, pred_type="glm")
    mean_logits = functional_call(net, vi.mean(), (x,))
    jac = torch.func.jacrev(lambda w: functional_call(net, w, (x,)))(vi.mean())
    variance = sum((jac[n].square() * vi.std()[n].square()).flatten(2).sum(-1) for n in vi.names)
    expected = torch.softmax(mean_logits / torch.sqrt(1 + math.pi / 8 * variance), -1)
    torch.testing.assert_close(pred.probs, expected, rtol=1e-5, atol=1e-6)


def test_bad_pred_type_link_or_posterior_names_the_argument():
    net, loader = _mlp(), _data()
    la = bk.DiagLaplace(net, seed=0).fit(loader, progress=False)
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="pred_type"):
        bk.predict(la, x, pred_type="linear")
    with pytest.raises(ValueError, match="link_approx"):
        bk.predict(la, x, link_approx="bridge")
    with pytest.raises(TypeError, match="pred_type='glm'"):
        bk.predict(bk.MCDropout(net, num_data=40, seed=0), x, pred_type="glm")


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_last_layer_probit_is_closed_form_and_equals_laplace_torch(structure, monkeypatch):
    """params="last_layer": the head's Jacobian is its input features, so no autodiff runs (the generic
    Jacobian path is switched off here); the probabilities equal laplace-torch's last-layer Laplace
    (its diagonal with the BackPACK backend: laplace-torch 0.3's curvlinops one returns a zero
    curvature for a last layer)."""
    from bayeskern.predictive import glm

    net, loader = _mlp(), _data()
    oracle = laplace.Laplace(
        net,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        backend=curvature.BackPackEF if structure == "diag" else curvature.CurvlinopsEF,
        prior_precision=0.7,
    )
    oracle.fit(loader)
    mine_class = bk.DiagLaplace if structure == "diag" else bk.KronLaplace
    mine = mine_class(net, params="last_layer", prior_mean="zero", prior_precision=0.7, seed=0)
    mine.fit(loader, progress=False)
    monkeypatch.setattr(glm._Linearized, "_jacobians", lambda self, x: pytest.fail("the generic path ran"))
    x = torch.randn(9, 5)
    got = bk.predict(mine, x)
    torch.testing.assert_close(got.probs, oracle(x, pred_type="glm", link_approx="probit"), rtol=1e-4, atol=1e-5)


def test_a_head_whose_output_is_changed_takes_the_generic_jacobian():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    net = Scaled()
    la = bk.DiagLaplace(net, params="last_layer", seed=0).fit(_data(), progress=False)
    x = torch.randn(6, 5)
    got = bk.predict(la, x)
    mean, std = la.mean(), la.std()
    rows = torch.func.jacrev(lambda w: functional_call(net, w, (x,)))(mean)  # (N, C, *shape): rows per example
    variance = sum((rows[n].square() * std[n].square()).flatten(2).sum(-1) for n in la.names)
    expected = torch.softmax(functional_call(net, mean, (x,)) / torch.sqrt(1 + math.pi / 8 * variance), -1)
    torch.testing.assert_close(got.probs, expected, rtol=1e-5, atol=1e-6)


def test_the_mc_link_draws_each_sample_once_across_batches(monkeypatch):
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    la = bk.DiagLaplace(net, seed=2).fit(_data(), progress=False)
    x = torch.randn(8, 5)
    drawn = []
    original = bk.DiagLaplace.sample
    monkeypatch.setattr(bk.DiagLaplace, "sample", lambda self, i: drawn.append(i) or original(self, i))
    batched = bk.predict(la, [x[:4], x[4:]], pred_type="glm", link_approx="mc", num_samples=10)
    assert sorted(drawn) == list(range(10))  # kept for the second batch, not drawn again
    whole = bk.predict(la, x, pred_type="glm", link_approx="mc", num_samples=10)
    torch.testing.assert_close(batched.probs, whole.probs, rtol=1e-6, atol=1e-7)
