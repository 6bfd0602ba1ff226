"""The Monte-Carlo predictive engine compiled vs eager, and the VI sampling op's backward.

(The training steps of every posterior against the deterministic network, with peak memory, are in
test_bench_methods.py.)

* ``predict S=32 <posterior> <model>``: ``bayeskern.predict`` compiled against the eager loop of S
  functional forwards (``compile=False``, the baseline); compilation happens before timing (it is
  paid once per model).  ``vi`` draws the S weight samples inside the call (end to end);
  ``drawn`` predicts stored samples, timing the engine alone.  Models: an MLP 784-1024-1024-10 at
  batch 512, timm's resnet18 on 32x32 inputs at batch 32 and a small MLP 784-128-128-10 at batch
  16, where per-call overhead matters most.
* ``predict S=32 last-layer vi <model>``: a VI posterior over the classifier only, predicted by
  ``bayeskern.predict`` (compiled; the network up to the classifier runs once per batch) against the
  loop a user writes without it, S eager ``functional_call`` forwards of the whole network with
  ``{**post.fixed_tensors(), **post.sample(s)}`` (the baseline).
* ``eps regenerate vs keep <n>``: the rho-gradient of ``gaussian_sample`` with eps regenerated in
  the fused backward kernel (the baseline) against reading an eps kept from the forward.
* ``vi fused backward resnet18 params``: the C++ backward of ``gaussian_sample_kl`` over resnet18's
  parameters (posterior std 1e-3, prior mean the weights) regenerating the noise (the baseline)
  against recovering it from the drawn weights (what a float32 training step does).

``BAYESKERN_BENCH_QUICK=1`` shrinks models and batches to check the suite runs.
"""

import math

import pytest
import timm
import torch
from bench_utils import QUICK, record, size_label
from torch import nn
from torch.func import functional_call

import bayeskern.ops as ops
from bayeskern.ops.philox import tensor_offsets
from bayeskern.posteriors.vi import VI
from bayeskern.predictive import predict

NUM_CLASSES = 10


def mlp_case():
    width, batch = (64, 32) if QUICK else (1024, 512)
    model = nn.Sequential(
        nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, NUM_CLASSES)
    )
    return model, torch.randn(batch, 784)


def resnet18_case():
    model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES)
    return model, torch.randn(4 if QUICK else 32, 3, 32, 32)


def small_mlp_case():
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
    return model, torch.randn(16, 784)


PREDICT_MODELS = {"mlp": mlp_case, "resnet18": resnet18_case, "small_mlp": small_mlp_case}


class DrawnSamples:
    """A posterior whose samples are drawn once and stored (as SGLD's SampleBank keeps them), so
    predicting it times the engine alone."""

    def __init__(self, post, num_samples: int) -> None:
        self.model, self.names, self.likelihood, self.noise_std = (
            post.model,
            post.names,
            post.likelihood,
            post.noise_std,
        )
        self.output_fn, self.is_sharded, self.pred_type = post.output_fn, False, "nn"
        self.fixed = post.fixed_tensors()
        self.samples = [post.sample(i) for i in range(num_samples)]

    def sample(self, index: int):
        return self.samples[index]

    def fixed_tensors(self):
        return self.fixed


@pytest.mark.parametrize("model_name", list(PREDICT_MODELS))
@pytest.mark.parametrize("posterior", ["vi", "drawn"])
@pytest.mark.parametrize("impl", ["eager_loop", "compiled"])
def test_predict(benchmark, model_name, posterior, impl):
    torch.manual_seed(0)
    model, x = PREDICT_MODELS[model_name]()
    num_samples = 4 if QUICK else 32
    post = VI(model, init_std=1e-2, num_data=50_000, seed=0)
    if posterior == "drawn":
        post = DrawnSamples(post, num_samples)
    compiled = impl == "compiled"
    predict(post, x, num_samples=num_samples, compile=compiled)  # compile once, outside the timing
    record(
        benchmark,
        f"predict S={num_samples} {posterior} {model_name} b{x.shape[0]}",
        impl,
        baseline=not compiled,
        model=model_name,
        samples=num_samples,
    )
    benchmark(predict, post, x, num_samples=num_samples, compile=compiled)


def full_forwards(post, x, num_samples):
    total = 0
    with torch.no_grad():
        fixed = post.fixed_tensors()
        for s in range(num_samples):
            total = total + functional_call(post.model, {**fixed, **post.sample(s)}, (x,)).softmax(-1)
    return total / num_samples


@pytest.mark.parametrize("model_name", ["mlp", "resnet18"])
@pytest.mark.parametrize("impl", ["full_forwards", "predict"])
def test_predict_last_layer(benchmark, model_name, impl):
    torch.manual_seed(0)
    model, x = PREDICT_MODELS[model_name]()
    model.eval()
    num_samples = 4 if QUICK else 32
    post = VI(model, init_std=1e-2, num_data=50_000, params="last_layer", seed=0)
    if impl == "predict":
        predict(post, x, num_samples=num_samples)  # compile once, outside the timing
        run = lambda: predict(post, x, num_samples=num_samples)  # noqa: E731
    else:
        run = lambda: full_forwards(post, x, num_samples)  # noqa: E731
    torch.testing.assert_close(
        predict(post, x, num_samples=num_samples).probs, full_forwards(post, x, num_samples), rtol=1e-4, atol=1e-5
    )
    record(
        benchmark,
        f"predict S={num_samples} last-layer vi {model_name} b{x.shape[0]}",
        impl,
        baseline=impl == "full_forwards",
        model=model_name,
        samples=num_samples,
    )
    benchmark(run)


@pytest.mark.parametrize("numel", [2**16 if QUICK else 2**22], ids=size_label)
@pytest.mark.parametrize("impl", ["regenerate", "keep"])
def test_eps_regenerate_vs_keep(benchmark, numel, impl):
    """The backward of ``w = mu + softplus(rho) * eps`` for rho: regenerating eps inside the fused
    kernel vs reading an eps kept from the forward (``sigmoid(rho) * eps * g``; keeping also costs a
    4 B/element write in the forward and holds 4 B/element until the backward)."""
    rho = torch.full((numel,), -3.0)
    grad = torch.randn(numel)
    eps = torch.randn(numel)
    kernel = ops.backend.kernels("cpp") if "cpp" in ops.available_backends("cpu") else None
    if kernel is None:
        pytest.skip("the C++ extension is not built")

    def regenerate():
        return kernel.gaussian_sample_backward(grad, rho, 1, 0, 0)

    def keep():
        return torch.sigmoid(rho).mul_(eps).mul_(grad)

    record(benchmark, f"eps regenerate vs keep {size_label(numel)}", impl, baseline=impl == "regenerate", numel=numel)
    benchmark(regenerate if impl == "regenerate" else keep)


@pytest.mark.parametrize("impl", ["regenerate", "from_samples"])
def test_fused_backward_noise(benchmark, impl):
    kernel = ops.backend.kernels("cpp") if "cpp" in ops.available_backends("cpu") else None
    if kernel is None:
        pytest.skip("the C++ extension is not built")
    model, _ = resnet18_case()
    mus = [p.detach() for p in model.parameters()]
    rhos = [torch.full_like(mu, math.log(math.expm1(1e-3))) for mu in mus]
    args = ([mu.clone() for mu in mus], [1.0] * len(mus), 1, tensor_offsets([mu.shape for mu in mus]), 0)
    samples, _ = kernel.gaussian_sample_kl(mus, rhos, *args)
    grads = [torch.randn_like(mu) for mu in mus]
    grad_kl = torch.tensor(1e-5)
    given = samples if impl == "from_samples" else []
    record(
        benchmark,
        "vi fused backward resnet18 params",
        impl,
        baseline=impl == "regenerate",
        numel=sum(mu.numel() for mu in mus),
    )
    benchmark(kernel.gaussian_sample_kl_backward, grads, grad_kl, mus, rhos, given, *args)
