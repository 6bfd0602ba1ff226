"""Jacobian rows from the layers (``curvature/rows.py``, ``predictive/layer_rows.py``): equal to the
per-example Jacobians of ``torch.func.jacrev`` on MLPs, CNNs with norms and grouped or reflect-padded
convolutions, token models with embeddings; the GLM probit built on them equals the one built on
jacrev's Jacobians; what the layers cannot give (a tied weight, a module run twice) falls back with a
warning to the same answer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import bayeskern as bk
from bayeskern.curvature.rows import OuterRows
from bayeskern.predictive import glm
from bayeskern.predictive.layer_rows import LayerRows, RowsUnavailable


class Tokens(nn.Module):
    """Embedding, LayerNorm, a Linear over every token, the mean over tokens, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.norm(self.embed(ids)))).mean(1))


class Residual(nn.Module):
    """In-place operations on a Linear's output and on a LayerNorm's, as torchvision's blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(5, 5), nn.LayerNorm(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h += x
        h = self.norm(torch.relu_(h))
        return self.head(h.tanh_())


class Tied(nn.Module):
    """``fc``'s weight is read again outside ``fc``'s forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(h + F.linear(h, self.fc.weight))


class Twice(nn.Module):
    """``fc`` runs twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _case(kind: str) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    if kind == "mlp":
        net: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(24, 5)
    elif kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),  # changes the norm's output after its hook saw it
            nn.Conv2d(4, 4, 3, stride=2, groups=2),  # grouped: no outer form
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False),  # reflect: no outer form
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Conv2d(4, 3, 2, stride=2, bias=False),
            nn.Flatten(),
            nn.Linear(3, 3),
        )
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        x = torch.randn(24, 2, 6, 6)
    elif kind == "residual":
        net = Residual()
        x = torch.randn(24, 5)
    elif kind == "tokens":
        net = Tokens()
        x = torch.randint(0, 11, (24, 4))
    else:
        net = {"tied": Tied, "twice": Twice}[kind]()
        x = torch.randn(24, 5)
    net.eval()
    with torch.no_grad():
        y = net(x).argmax(-1)
    return net, DataLoader(TensorDataset(x, y), batch_size=8)


def _jacobians(net: nn.Module, mean: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {n: t.detach() for n, t in [*net.named_parameters(), *net.named_buffers()]}
    return jacrev(lambda theta: functional_call(net, {**state, **theta}, (x,)))(mean)


def _dense(row, shape: torch.Size) -> torch.Tensor:
    return row.dense().reshape(*row.lead, *shape) if isinstance(row, OuterRows) else row


@pytest.mark.parametrize("kind", ["mlp", "cnn", "residual", "tokens"])
def test_rows_equal_jacrev(kind):
    net, loader = _case(kind)
    x = loader.dataset.tensors[0][:6]
    mean = {n: p.detach() for n, p in net.named_parameters()}
    state = {n: t.detach() for n, t in [*net.named_parameters(), *net.named_buffers()]}
    rows_of = LayerRows(net, state, mean)
    function = lambda theta: functional_call(net, {**state, **theta}, (x,))  # noqa: E731
    f_star, rows = rows_of(function, x, 6, budget=1 << 30)
    torch.testing.assert_close(f_star, net(x))
    expected = _jacobians(net, mean, x)
    assert set(rows) == set(expected)
    for name, jac in expected.items():
        torch.testing.assert_close(_dense(rows[name], mean[name].shape), jac, rtol=1e-5, atol=1e-6, msg=name)
    kinds = {type(rows[n]).__name__ for n in rows}
    assert "OuterRows" in kinds and (kind == "mlp" or "Tensor" in kinds)  # both paths ran where both apply


def test_outer_rows_products_equal_the_formed_rows():
    torch.manual_seed(0)
    for positions in (1, 5):
        rows = OuterRows(torch.randn(4, 3, positions, 6), torch.randn(4, 1, positions, 7))
        dense = torch.einsum("ncto,ncti->ncoi", rows.grads, rows.inputs.expand(4, 3, positions, 7))
        torch.testing.assert_close(rows.dense(), dense)
        weights, matrix = torch.rand(6, 7), torch.randn(6, 7)
        torch.testing.assert_close(rows.weighted_square_sum(weights), (dense.square() * weights).sum((-2, -1)))
        torch.testing.assert_close(rows.dot(matrix), (dense * matrix).sum((-2, -1)))
        left, right = torch.linalg.qr(torch.randn(6, 6))[0], torch.linalg.qr(torch.randn(7, 7))[0]
        torch.testing.assert_close(rows.rotated(left, right).dense(), left.T @ dense @ right, rtol=1e-5, atol=1e-5)


def _probit_from_jacrev(posterior, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mean = posterior.mean()
    variance = posterior.functional_variance(_jacobians(net, mean, x))
    f_star = net(x)
    return torch.softmax(f_star / torch.sqrt(1 + math.pi / 8 * variance.float()), -1)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "residual", "tokens"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_probit_from_the_layers_equals_jacrev(kind, structure):
    net, loader = _case(kind)
    cls = bk.DiagLaplace if structure == "diag" else bk.KronLaplace
    la = cls(net, prior_precision=2.0, seed=0).fit(loader, progress=False)
    x = loader.dataset.tensors[0][:10]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        got = bk.predict(la, x, pred_type="glm", link_approx="probit", batch_size=4)
    torch.testing.assert_close(got.probs, _probit_from_jacrev(la, net, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["tied", "twice"])
def test_what_the_layers_cannot_give_falls_back_to_jacrev(kind):
    net, loader = _case(kind)
    la = bk.DiagLaplace(net, prior_precision=2.0, seed=0).fit(loader, progress=False)
    x = loader.dataset.tensors[0][:10]
    reason = "miss a use" if kind == "tied" else "ran 2 times"
    with pytest.warns(RuntimeWarning, match=reason):
        got = bk.predict(la, x, pred_type="glm", link_approx="probit")
    torch.testing.assert_close(got.probs, _probit_from_jacrev(la, net, x), rtol=1e-5, atol=1e-6)
    state = {n: t.detach() for n, t in net.state_dict().items()}
    with pytest.raises(RowsUnavailable):
        LayerRows(net, state, la.mean())(lambda theta: functional_call(net, {**state, **theta}, (x,)), x, 10, 1 << 30)


def test_a_batch_over_the_budget_is_taken_in_chunks(monkeypatch):
    net, loader = _case("cnn")
    la = bk.KronLaplace(net, prior_precision=2.0, seed=0).fit(loader, progress=False)
    x = loader.dataset.tensors[0]
    whole = bk.predict(la, x, pred_type="glm", link_approx="probit").probs
    monkeypatch.setattr(glm, "JACOBIAN_BYTES", 20_000)  # a few examples' rows
    calls = []
    original = LayerRows.__call__
    monkeypatch.setattr(
        LayerRows, "__call__", lambda self, f, part, n, b: calls.append(n) or original(self, f, part, n, b)
    )
    chunked = bk.predict(la, x, pred_type="glm", link_approx="probit").probs
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert calls[0] == len(x) and 1 <= max(calls[1:]) < len(x)
