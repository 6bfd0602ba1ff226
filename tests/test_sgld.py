"""BayesSGLD and ops.sgld_step_: the update formula, the posterior it samples, every backend, checkpoints."""

import math

import pytest
import torch

from bayeskern.ops import philox, use_backend
from bayeskern.ops.sgld import first_nonfinite, sgld_step_
from bayeskern.posteriors.sgld import BayesSGLD

IMPLS = {"reference": dict(foreach=False, fused=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def eager_sgld(
    theta, grad, theta0, lr, num_data, prior_std, temperature, seed, offset, step, avg=None, alpha=0.99, eps=1e-8
):
    """The update written out by hand in float64, with the noise of bayeskern.ops.philox."""
    theta, grad, theta0 = theta.double(), grad.double(), theta0.double()
    xi = philox.normal(seed, offset, theta.numel(), stream=step).view(theta.shape).double()
    g_tot = grad + (theta - theta0) / (num_data * prior_std**2)
    if avg is None:
        return theta - lr * g_tot + math.sqrt(2 * lr * temperature / num_data) * xi, None
    avg = alpha * avg.double() + (1 - alpha) * g_tot**2
    precond = 1 / (eps + avg.sqrt())
    return theta - lr * precond * g_tot + (2 * lr * temperature * precond / num_data).sqrt() * xi, avg


def quadratic_grads(params, targets):
    loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
    loss.backward()


def make_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


SHAPES = [(3, 5), (7,), (2, 3, 3), (1,)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preconditioner", [None, "rmsprop"])
def test_steps_match_hand_written_update_with_philox_noise(impl, preconditioner):
    params = make_params(SHAPES)
    theta0 = [p.detach().clone() for p in params]
    targets = [torch.full_like(p, 0.5) for p in params]
    hyper = dict(lr=0.05, num_data=20, prior_std=0.7, temperature=1.5, eps=0.01)  # eps bounds G: no 1e8 amplification
    opt = BayesSGLD(params, prior_mean="pretrained", preconditioner=preconditioner, seed=11, **hyper, **IMPLS[impl])
    offsets = [0, 16, 24, 44]  # cumulative sizes 15, 7, 18, 1 rounded up to multiples of 4
    avgs = [torch.zeros_like(p, dtype=torch.float64) if preconditioner else None for p in params]
    for step in range(3):
        opt.zero_grad()
        quadratic_grads(params, targets)
        expected = []
        for i, p in enumerate(params):
            want, avgs[i] = eager_sgld(
                p.detach(), p.grad, theta0[i], **hyper, seed=11, offset=offsets[i], step=step, avg=avgs[i]
            )
            expected.append(want)
        opt.step()
        for p, want in zip(params, expected):
            torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preconditioner", [None, "rmsprop"])
def test_every_backend_gives_the_reference_trajectory(kernel_backend, device, dtype, preconditioner):
    shapes = [(33, 9), (5,), (130,)]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def run(name):
        params = make_params(shapes, dtype, device=device)
        # eps = 0.1 bounds the preconditioner (G <= 10) so that rounding differences are not amplified
        opt = BayesSGLD(
            params, lr=0.02, num_data=50, prior_mean="pretrained", preconditioner=preconditioner, eps=0.1, seed=5
        )
        targets = [torch.ones_like(p) for p in params]
        with use_backend(name):
            for _ in range(3):
                opt.zero_grad()
                quadratic_grads(params, targets)
                opt.step()
        return [p.detach().float() for p in params]

    for got, want in zip(run(kernel_backend), run("reference")):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.fixture
def one_thread():
    """Hundreds of tiny steps: thread hand-offs would dominate (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_regression(num_data=40, dim=3, noise_std=0.5, prior_std=1.0):
    """Data, exact posterior mean and covariance of w under y = X w + N(0, noise_std^2), w ~ N(0, prior_std^2 I)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(num_data, dim, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise_std * torch.randn(
        num_data, generator=gen, dtype=torch.float64
    )
    precision = x.T @ x / noise_std**2 + torch.eye(dim, dtype=torch.float64) / prior_std**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / noise_std**2
    return x.float(), y.float(), mean, cov, precision


def run_chains(opt, w, x, y, noise_std, steps):
    # loss = sum over chains of the mean NLL of that chain's weights (chains do not interact), written
    # with the sufficient statistics X^T X, X^T y, y^T y so that a step costs O(chains * dim^2)
    gram, xty, yty, n = x.T @ x, x.T @ y, y @ y, x.shape[0]
    for _ in range(steps):
        opt.zero_grad()
        sq_residuals = (w[:, :, None] * w[:, None, :] * gram).sum((1, 2)) - 2 * (w * xty).sum(1) + yty  # no BLAS call
        (sq_residuals.sum() / (2 * noise_std**2 * n)).backward()
        opt.step()


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_chain_samples_the_exact_bayesian_linear_regression_posterior(impl, one_thread):
    x, y, mean, cov, precision = linear_regression()
    num_data, noise_std, chains = x.shape[0], 0.5, 4000
    lam_max = torch.linalg.eigvalsh(precision).max().item()
    lr = 0.02 * num_data / lam_max  # a = lr * lam / N <= 0.02: discretisation bias of the variance a/2 <= 1%
    w = torch.nn.Parameter(torch.zeros(chains, 3))
    opt = BayesSGLD(
        [w], lr=lr, num_data=num_data, prior_std=1.0, prior_mean="zero", temperature=1.0, seed=1, **IMPLS[impl]
    )
    run_chains(opt, w, x, y, noise_std, steps=600)  # slowest mode contracts by (1 - a_min)^600 < e^-5
    samples = w.detach().double()
    # The chains are independent, so the ESS is exactly `chains`; tolerances are 5 Monte-Carlo
    # standard errors: sd / sqrt(ESS) for the mean, var * sqrt(2 / (ESS - 1)) for the variance,
    # plus the 1% discretisation bias and the e^-5 remainder of the initial point.
    sd = cov.diagonal().sqrt()
    assert ((samples.mean(0) - mean).abs() <= 5 * sd / math.sqrt(chains) + 0.01 * mean.abs()).all()
    rel_var = samples.var(0) / cov.diagonal() - 1
    assert (rel_var.abs() <= 5 * math.sqrt(2 / (chains - 1)) + 0.01).all(), rel_var
    torch.testing.assert_close(
        torch.cov(samples.T), cov, atol=6 * cov.diagonal().max().item() / math.sqrt(chains), rtol=0
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_temperature_converges_to_the_ridge_solution(impl, one_thread):
    x, y, mean, _, precision = linear_regression()
    num_data, noise_std = x.shape[0], 0.5
    lr = num_data / torch.linalg.eigvalsh(precision).max().item()  # a_max = 1, a_min > 0.1
    w = torch.nn.Parameter(torch.zeros(1, 3))
    opt = BayesSGLD([w], lr=lr, num_data=num_data, prior_mean="zero", temperature=0.0, seed=1, **IMPLS[impl])
    run_chains(opt, w, x, y, noise_std, steps=300)
    torch.testing.assert_close(w.detach().double()[0], mean, rtol=1e-5, atol=1e-5)


def test_lr_scheduler_changes_the_step():
    params = make_params([(4, 4)])
    opt = BayesSGLD(params, lr=0.1, num_data=10, prior_mean="zero", seed=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    zero = torch.zeros(4, 4)
    for step, lr in enumerate([0.1, 0.025, 0.00625]):
        opt.zero_grad()
        quadratic_grads(params, [zero])
        expected, _ = eager_sgld(
            params[0].detach(), params[0].grad, zero, lr, 10, 1.0, 1.0, seed=2, offset=0, step=step
        )
        opt.step()
        sched.step()
        torch.testing.assert_close(params[0].detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_cosine_warm_restarts_cycle_the_lr():
    params = make_params([(3,)])
    opt = BayesSGLD(params, lr=0.1, num_data=10)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4)
    lrs = []
    for _ in range(8):
        opt.zero_grad()
        quadratic_grads(params, [torch.zeros(3)])
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[3] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1) and lrs[2] < 0.02


def test_param_groups_use_their_own_hyperparameters():
    a, b = make_params([(6,), (5,)])
    b0 = torch.randn(5, generator=torch.Generator().manual_seed(1))
    group_b = {
        "params": [b],
        "lr": 0.3,
        "prior_std": 0.5,
        "temperature": 0.2,
        "prior_mean": [b0],
        "preconditioner": "rmsprop",
        "eps": 0.1,
    }
    opt = BayesSGLD(
        [{"params": [a]}, group_b],
        lr=0.01,
        num_data=8,
        prior_mean="zero",
        seed=4,
    )
    opt.zero_grad()
    quadratic_grads([a, b], [torch.ones(6), torch.ones(5)])
    want_a, _ = eager_sgld(a.detach(), a.grad, torch.zeros(6), 0.01, 8, 1.0, 1.0, seed=4, offset=0, step=0)
    want_b, _ = eager_sgld(
        b.detach(), b.grad, b0, 0.3, 8, 0.5, 0.2, seed=4, offset=8, step=0, avg=torch.zeros(5), eps=0.1
    )
    opt.step()
    torch.testing.assert_close(a.detach().double(), want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.detach().double(), want_b, rtol=1e-5, atol=1e-6)


def test_prior_mean_tensors_are_copied_and_checked():
    a, b = make_params([(2, 2), (3,)])
    means = [torch.ones(2, 2), torch.ones(3)]
    opt = BayesSGLD([a, b], lr=0.1, num_data=4, prior_mean=means)
    means[0].add_(5)
    assert torch.equal(opt.state[a]["prior_mean"], torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"prior_mean\[1\] has shape \(4,\)"):
        BayesSGLD([a, b], lr=0.1, num_data=4, prior_mean=[torch.ones(2, 2), torch.ones(4)])
    with pytest.raises(ValueError, match="prior_mean"):
        BayesSGLD([a, b], lr=0.1, num_data=4, prior_mean=[torch.ones(2, 2)])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(num_data=0), "num_data"),
        (dict(prior_std=0.0), "prior_std"),
        (dict(temperature=-0.1), "temperature"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(eps=-1e-3), "eps"),
        (dict(preconditioner="adam"), "preconditioner"),
        (dict(nonfinite="warn"), "nonfinite"),
        (dict(seed=-3), "seed"),
        (dict(prior_mean="zeros"), "prior_mean"),
        (dict(foreach=True, fused=True), "fused"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(kwargs, name):
    args = dict(lr=0.1, num_data=10) | kwargs
    with pytest.raises(ValueError, match=name):
        BayesSGLD(make_params([(2,)]), **args)
    with pytest.raises(ValueError, match=name):  # the same checks guard a param group
        BayesSGLD([{"params": make_params([(2,)]), **kwargs}], lr=0.1, num_data=10)


def test_sgld_step_checks_its_arguments():
    p, g = torch.zeros(3), torch.zeros(3)
    common = dict(lr=0.1, num_data=5, seed=0, step=0)
    with pytest.raises(ValueError, match="grads"):
        sgld_step_([p], [], offsets=[0], **common)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        sgld_step_([p], [torch.zeros(4)], offsets=[0], **common)
    with pytest.raises(ValueError, match=r"prior_means\[0\]"):
        sgld_step_([p], [g], [torch.zeros(3, dtype=torch.float64)], offsets=[0], **common)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        sgld_step_([p, p.half()], [g, g.half()], offsets=[0, 4], **common)
    with pytest.raises(ValueError, match="offsets"):
        sgld_step_([p], [g], offsets=[-4], **common)
    with pytest.raises(ValueError, match="step"):
        sgld_step_([p], [g], offsets=[0], lr=0.1, num_data=5, seed=0, step=-1)


@pytest.mark.parametrize("impl", IMPLS)
def test_resumed_run_reproduces_the_uninterrupted_run_bitwise(impl):
    torch.manual_seed(0)
    data = torch.randn(16, 4), torch.randn(16, 2)

    def fresh(generator_seed, state=None):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        if state is not None:
            model.load_state_dict(state)
        torch.manual_seed(generator_seed)  # the optimizer draws its Philox seed from torch's generator
        opt = BayesSGLD(
            model.parameters(), lr=0.01, num_data=100, prior_mean="pretrained", preconditioner="rmsprop", **IMPLS[impl]
        )
        return model, opt

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(data[0]), data[1]).backward()
            opt.step()

    model, opt = fresh(3)
    train(model, opt, 10)
    first, opt_a = fresh(3)
    train(first, opt_a, 5)
    checkpoint = {"model": first.state_dict(), "opt": opt_a.state_dict()}
    # a new process: another seed drawn and a "pretrained" snapshot of the wrong weights, both restored
    resumed, opt_b = fresh(4, checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    train(resumed, opt_b, 5)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_non_finite_gradients_never_touch_the_parameters(mode, bad):
    a, b = make_params([(3,), (4,)])
    before = [a.detach().clone(), b.detach().clone()]
    opt = BayesSGLD([a, b], lr=0.1, num_data=4, nonfinite=mode)
    a.grad = torch.ones(3)
    b.grad = torch.tensor([0.0, bad, 1.0, 2.0])
    if mode == "raise":
        with pytest.raises(RuntimeError, match="parameter 1 "):
            opt.step()
    else:
        opt.step()
        assert opt.param_groups[0]["skipped_steps"] == 1 and opt.param_groups[0]["step"] == 0
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


def test_huge_finite_gradients_are_not_flagged():
    a = make_params([(1000,)])[0]
    opt = BayesSGLD([a], lr=1e-40, num_data=4, temperature=0.0)
    a.grad = torch.full((1000,), 3e38)  # its sum of squares overflows float32, its values do not
    opt.step()
    assert opt.param_groups[0]["step"] == 1 and torch.isfinite(a).all()


def test_non_finite_error_names_named_parameters():
    model = torch.nn.Linear(2, 2)
    opt = BayesSGLD(model.named_parameters(), lr=0.1, num_data=4)
    model.weight.grad = torch.zeros(2, 2)
    model.bias.grad = torch.tensor([float("inf"), 0.0])
    with pytest.raises(RuntimeError, match="'bias'"):
        opt.step()


def test_kernel_matches_reference_on_unaligned_offsets_across_threads(kernel_backend, device):
    # tensors large enough to be split over threads, placed at offsets that are not multiples of 4
    shapes = [(40000,), (3,), (5, 7000), (1,), (17,), (2, 2), (1000,)]
    offsets = [1, 40006, 40013, 80030, 80035, 80054, 80058]
    gen = torch.Generator().manual_seed(3)
    make = lambda: [torch.randn(s, generator=gen).to(device) for s in shapes]  # noqa: E731
    params, grads, means, avgs = make(), make(), make(), [a.abs() for a in make()]
    results = {}
    for name in (kernel_backend, "reference"):
        p, v = [t.clone() for t in params], [t.clone() for t in avgs]
        with use_backend(name):
            sgld_step_(
                p, grads, means, v, lr=0.1, num_data=7, prior_std=0.8, temperature=0.6, seed=9, step=4, offsets=offsets
            )
        results[name] = p + v
    for got, want in zip(results[kernel_backend], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_first_nonfinite_finds_the_first_bad_tensor(backend, device, dtype):
    sizes = [5, 70000, 3, 140000]  # several 64K-element chunks per tensor on the C++ path
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in [(3, 139999), (1, 65536), (2, 0)]:
            tensors = [torch.randn(n).to(device, dtype) for n in sizes]
            tensors[where[0]][where[1]] = bad
            tensors[3][7] = bad
            oracle = next(i for i, t in enumerate(tensors) if not torch.isfinite(t).all())
            with use_backend(backend):
                assert first_nonfinite(tensors) == oracle
    with use_backend(backend):
        assert (
            first_nonfinite(
                [torch.randn(n).to(device, dtype) for n in sizes] + [torch.empty(0, dtype=dtype, device=device)]
            )
            is None
        )
        huge = 6e4 if dtype == torch.float16 else 3e38
        assert first_nonfinite([torch.full((10,), huge, dtype=dtype, device=device)]) is None


def test_sgld_step_custom_op_passes_opcheck(backend, device):
    from bayeskern.ops.sgld import _sgld_step_

    params, grads, means, avgs = ([torch.randn(9, device=device), torch.randn(2, 3, device=device)] for _ in range(4))
    avgs = [a.abs() for a in avgs]
    with use_backend(backend):
        torch.library.opcheck(
            _sgld_step_,
            (params, grads, means, avgs, 0.1, 0.2, 0.3, 0.9, 1e-3, torch.tensor(5), 2, [0, 12]),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_noise_normal_is_the_philox_spec(kernel_backend, device):
    from bayeskern.ops import noise

    with use_backend(kernel_backend):
        got = noise.normal((3, 7), 21, 5, stream=3, device=device)
    torch.testing.assert_close(got, philox.normal(21, 5, 21, stream=3, device=device).view(3, 7), rtol=1e-6, atol=1e-6)


def test_fused_step_handles_a_group_of_mixed_dtypes():
    def run(**impl):
        a, b = make_params([(6,)])[0], make_params([(5,)], dtype=torch.float16)[0]
        opt = BayesSGLD([a, b], lr=0.05, num_data=10, seed=8, **impl)
        for _ in range(2):
            opt.zero_grad()
            quadratic_grads([a, b], [torch.ones(6), torch.ones(5, dtype=torch.float16)])
            opt.step()
        return a.detach(), b.detach()

    for got, want in zip(run(fused=True), run(foreach=False, fused=False)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
