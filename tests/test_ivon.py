"""``bk.IVON``: the Bayesian linear regression oracle, ``ivon-opt`` fed the same noise, the prior mean
it decays to, the step pattern's errors, checkpoints and resume, its state's size, its posterior."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayeskern as bk
from bayeskern.ops import noise, use_backend


def _regression(n: int = 200, s: float = 0.5, sp: float = 1.0):
    torch.manual_seed(0)
    x = torch.randn(n, 5) * torch.tensor([1.0, 0.5, 2.0, 1.0, 0.3])
    y = x @ torch.randn(5) + s * torch.randn(n)
    precision = x.T @ x / s**2 + torch.eye(5) / sp**2
    return x, y, torch.linalg.solve(precision, x.T @ y / s**2), precision.diagonal().rsqrt()


def _regression_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s: float = 0.5) -> torch.Tensor:
    return ((y - x @ w) ** 2).mean() / (2 * s**2)  # the mean NLL, up to a constant


def test_bayesian_linear_regression_mean_and_mean_field_std():
    """The mean within 2% (relative norm) of the exact posterior mean, the std within 15% of the
    mean-field optimum 1 / sqrt(diag(X^T X / s^2 + 1 / sp^2))."""
    x, y, exact_mean, mean_field_std = _regression()
    w = nn.Parameter(torch.zeros(5))
    opt = bk.IVON([w], lr=0.1, num_data=len(y), prior_mean="zero", beta2=0.999, seed=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    for _ in range(3000):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            _regression_loss(w, x, y).backward()
        opt.step()
        schedule.step()
    assert (w.detach() - exact_mean).norm() / exact_mean.norm() < 0.02
    ratio = opt.std()[0] / mean_field_std
    assert ((ratio - 1).abs() < 0.15).all(), ratio


def test_equals_ivon_opt_fed_the_same_noise(monkeypatch):
    ivon = pytest.importorskip("ivon", reason="ivon-opt is the oracle (pip install '.[test]')")
    x, y, _, _ = _regression()
    n, sp, lr = len(y), 2.0, 0.05
    mine, theirs = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(5))
    opt = bk.IVON([mine], lr=lr, num_data=n, prior_std=sp, prior_mean="zero", hess_init=0.5, beta2=0.99, seed=3)
    oracle = ivon.IVON([theirs], lr=lr, ess=n, weight_decay=1 / (n * sp**2), hess_init=0.5, beta2=0.99)
    # ivon-opt draws torch.randn(numel) once per sample: give it the Philox normals bk.IVON just used
    stream = lambda: opt.param_groups[0]["draws"] - 1  # noqa: E731
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: noise.normal((5,), 3, 0, stream=stream()))
    for _ in range(40):
        for optimizer, w in ((opt, mine), (oracle, theirs)):  # bk.IVON first
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                _regression_loss(w, x, y).backward()
            optimizer.step()
    monkeypatch.undo()
    torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[mine]["hess"], oracle.param_groups[0]["hess"], rtol=1e-5, atol=1e-6)


def test_the_mean_decays_to_the_pretrained_prior_mean_and_the_std_to_the_prior_std():
    """A likelihood without information (zero gradients): m -> theta0 (the weights at construction, not
    zero), sigma -> sp sqrt(T)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6))
    theta0 = w.detach().clone()
    opt = bk.IVON([w], lr=0.5, num_data=10, prior_std=0.3, temperature=2.0, beta2=0.9, seed=0)
    with torch.no_grad():
        w.add_(1.0)
    for _ in range(400):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            (w * 0).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), theta0, rtol=0, atol=1e-4)
    torch.testing.assert_close(opt.std()[0], torch.full((6,), 0.3 * math.sqrt(2.0)), rtol=1e-3, atol=0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: bk.IVON, steps: int, start: int = 0) -> None:
    g = torch.Generator().manual_seed(11)
    batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(12)]
    for x, y in batches[start : start + steps]:
        for _ in range(opt.train_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                F.cross_entropy(model(x.to(model[0].weight.dtype)).float(), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_and_implementation_gives_the_reference_trajectory(kernel_backend, dtype):
    """Fused kernels (each backend) and foreach against the single-tensor reference: a group that mixes
    pretrained prior means with a new head's zero one, two samples per step and clipping."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]

    def run(backend, **implementation):
        model = _mlp().to(dtype)
        opt = bk.IVON(
            model.named_parameters(), lr=0.05, num_data=100, train_samples=2, new_params=["2.*"], clip_radius=0.02,
            seed=3, **implementation,
        )  # fmt: skip
        with use_backend(backend):
            _train(model, opt, 3)
        return [p.detach().float() for p in model.parameters()] + [s.float() for s in opt.std()]

    want = run("reference", foreach=False, fused=False)
    for got in (run(kernel_backend), run("reference", foreach=True)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_a_checkpoint_round_trips_and_resumes_bit_for_bit():
    whole = _mlp()
    opt = bk.IVON(whole.named_parameters(), lr=0.05, num_data=100, train_samples=2, new_params=["2.*"], seed=5)
    _train(whole, opt, 8)
    cut = _mlp()
    first = bk.IVON(cut.named_parameters(), lr=0.05, num_data=100, train_samples=2, new_params=["2.*"], seed=5)
    _train(cut, first, 4)
    buffer = io.BytesIO()
    torch.save({"model": cut.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _mlp()
    resumed.load_state_dict(saved["model"])
    second = bk.IVON(resumed.named_parameters(), lr=0.05, num_data=100, train_samples=2, seed=0)
    second.load_state_dict(saved["opt"])
    _train(resumed, second, 4, start=4)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert second.seed == 5 and torch.equal(second.state[resumed[2].weight]["prior_mean"], torch.zeros(3, 8))


def test_sampled_params_puts_the_mean_back_bit_for_bit_even_after_an_error():
    model = _mlp()
    opt = bk.IVON(model.parameters(), lr=0.05, num_data=100, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params():
        assert not torch.equal(model[0].weight, before[0])  # a sample is in place
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(KeyError), opt.sampled_params(train=True):
        raise KeyError("inside the block")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_step_without_collected_gradients_is_a_clear_error():
    model = _mlp()
    opt = bk.IVON(model.parameters(), lr=0.05, num_data=100, seed=0)
    F.cross_entropy(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long)).backward()  # outside the block
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()
    with opt.sampled_params():  # train=False collects nothing
        pass
    with pytest.raises(RuntimeError, match="no gradient was collected"):
        opt.step()


def test_a_closure_draws_train_samples_samples():
    model = _mlp()
    opt = bk.IVON(model.parameters(), lr=0.05, num_data=100, train_samples=3, seed=0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        calls.append(model[0].weight.detach().clone())
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 3 and not torch.equal(calls[0], calls[1]) and torch.isfinite(loss)
    assert not torch.equal(model[0].weight, before) and opt.param_groups[0]["step"] == 1


def test_a_non_finite_gradient_names_the_parameter_and_leaves_everything_untouched():
    model = _mlp()
    opt = bk.IVON(model.named_parameters(), lr=0.05, num_data=100, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter '2\.bias'"), opt.sampled_params(train=True):
        opt.zero_grad()
        (model(torch.randn(2, 4)).sum() + model[2].bias.sum() * float("nan")).backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="no gradient was collected"):
        opt.step()


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("lr", 0.0),
        ("lr", -1e-3),
        ("num_data", 0),
        ("hess_init", 0.0),
        ("beta1", 1.0),
        ("beta2", -0.1),
        ("prior_std", 0.0),
        ("temperature", 0.0),
        ("clip_radius", 0.0),
        ("train_samples", 0),
        ("prior_mean", "ones"),
    ],
)
def test_bad_hyperparameters_name_the_argument(argument, value):
    kwargs = {"lr": 0.1, "num_data": 10, argument: value}
    with pytest.raises(ValueError, match=argument):
        bk.IVON(_mlp().parameters(), **kwargs)


def test_foreach_and_fused_together_is_an_error():
    with pytest.raises(ValueError, match="foreach=True and fused=True"):
        bk.IVON(_mlp().parameters(), lr=0.1, num_data=10, foreach=True, fused=True)


def test_persistent_state_is_adamws_with_a_zero_prior_mean_and_one_copy_more_with_a_pretrained_one():
    def state_bytes(opt: torch.optim.Optimizer) -> int:
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    sizes = {}
    for kind in ("adamw", "zero", "pretrained"):
        model = _mlp()
        if kind == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            F.cross_entropy(model(torch.randn(4, 4)), torch.zeros(4, dtype=torch.long)).backward()
            opt.step()
        else:
            opt = bk.IVON(model.parameters(), lr=0.05, num_data=100, prior_mean=kind, seed=0)
            _train(model, opt, 1)
        sizes[kind] = state_bytes(opt)
    params = sum(p.numel() * 4 for p in _mlp().parameters())
    assert sizes["zero"] <= 1.05 * sizes["adamw"]
    assert sizes["pretrained"] == sizes["zero"] + params


def test_the_posterior_is_the_mean_and_std_and_predicts():
    model = _mlp()
    opt = bk.IVON(model.named_parameters(), lr=0.05, num_data=100, hess_init=0.05, seed=0)
    _train(model, opt, 3)
    post = opt.posterior(model)
    assert post.names == [n for n, _ in model.named_parameters()]
    for (name, p), std in zip(model.named_parameters(), opt.std()):
        assert torch.equal(post.mean()[name], p.detach()) and torch.equal(post.std()[name], std)
    draws = torch.stack([post.sample(i)["0.weight"] for i in range(2000)])
    torch.testing.assert_close(draws.std(0), post.std()["0.weight"], rtol=0.1, atol=0)
    assert torch.equal(post.sample(7)["0.weight"], post.sample(7)["0.weight"])
    x = torch.randn(5, 4)
    sampled = bk.predict(post, x, num_samples=4, compile=False)
    linearised = bk.predict(post, x, pred_type="glm")
    for prediction in (sampled, linearised):
        torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(5))
    assert sampled.mutual_info is not None
    state = post.state_dict()
    restored = bk.IVON(model.parameters(), lr=0.05, num_data=100, seed=1).posterior(model)
    restored.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert torch.equal(restored.sample(3)["2.weight"], post.sample(3)["2.weight"])


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
