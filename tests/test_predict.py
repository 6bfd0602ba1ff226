import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from bayeskern.posteriors import VI, DiagLaplace, MCDropout
from bayeskern.predictive import base, loop, predict
from bayeskern.protocol import Posterior


class TableOfSamples:
    """A minimal posterior: sample s replaces the weight of a bias-free linear model by W[s]."""

    output_fn = None
    is_sharded = False
    pred_type = "nn"

    def __init__(self, weights: torch.Tensor, likelihood: str = "classification", noise_std: float = 1.0) -> None:
        self.model = nn.Linear(weights.shape[2], weights.shape[1], bias=False)
        self.names = ["weight"]
        self.weights, self.likelihood, self.noise_std = weights, likelihood, noise_std

    def functional_forward(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, weights, (inputs,))

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weights[index]}

    def mean(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weights.mean(0)}

    def fixed_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self):
        return {"weights": self.weights}

    def load_state_dict(self, d):
        self.weights = d["weights"]


def table(num_samples=5, classes=4, features=3, likelihood="classification", seed=0):
    torch.manual_seed(seed)
    return TableOfSamples(2 * torch.randn(num_samples, classes, features), likelihood)


def test_classification_summaries_match_hand_computation():
    post = table()
    assert isinstance(post, Posterior)
    x = torch.randn(7, 3)
    pred = predict(post, x, pred_type="nn", num_samples=5, compile=False, return_logits=True)
    logits = torch.einsum("nf,scf->snc", x, post.weights)
    p = logits.softmax(-1)
    probs = p.mean(0)
    entropy = -(probs * probs.log()).sum(-1)
    expected = -(p * p.log()).sum(-1).mean(0)
    torch.testing.assert_close(pred.logits, logits)
    torch.testing.assert_close(pred.probs, probs)
    torch.testing.assert_close(pred.entropy, entropy)
    torch.testing.assert_close(pred.expected_entropy, expected)
    torch.testing.assert_close(pred.mutual_info, entropy - expected)
    assert pred.mean is None and pred.variance is None


def test_regression_mean_and_variance_match_hand_computation():
    post = table(num_samples=6, classes=2, likelihood="regression")
    x = torch.randn(9, 3)
    pred = predict(post, x, pred_type="nn", num_samples=6, compile=False, noise_std=0.5)
    outs = torch.einsum("nf,scf->snc", x, post.weights)
    torch.testing.assert_close(pred.mean, outs.mean(0))
    torch.testing.assert_close(pred.variance, outs.var(0, unbiased=False) + 0.25)
    assert pred.probs is None


def test_batches_and_dataloaders_give_the_same_result():
    post = table()
    x = torch.randn(10, 3)
    whole = predict(post, x, pred_type="nn", num_samples=5, compile=False)
    split = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=3)
    loader = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4)
    from_loader = predict(post, loader, pred_type="nn", num_samples=5, compile=False)
    bare_loader = predict(post, [x[:6], x[6:]], pred_type="nn", num_samples=5, compile=False)
    for other in (split, from_loader, bare_loader):
        torch.testing.assert_close(other.probs, whole.probs)
        torch.testing.assert_close(other.mutual_info, whole.mutual_info)


def test_samples_are_redrawn_identically_when_they_do_not_fit_the_cache(monkeypatch):
    post = table()
    x = torch.randn(10, 3)
    cached = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=4)
    monkeypatch.setattr(base, "SAMPLE_CACHE_BYTES", 0)
    calls = []
    original = post.sample
    post.sample = lambda i: calls.append(i) or original(i)
    redrawn = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=4)
    assert calls == list(range(5)) * 3
    torch.testing.assert_close(redrawn.probs, cached.probs)


def test_the_samples_that_fit_the_cache_are_kept_and_only_the_rest_redrawn(monkeypatch):
    post = table()
    x = torch.randn(10, 3)
    everything = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=4)
    sample_bytes = sum(t.numel() * t.element_size() for t in post.sample(0).values())
    monkeypatch.setattr(base, "SAMPLE_CACHE_BYTES", 2 * sample_bytes + sample_bytes // 2)
    calls = []
    original = post.sample
    post.sample = lambda i: calls.append(i) or original(i)
    partly = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=4)
    assert calls == [0, 1, 2, 3, 4] + [2, 3, 4] * 2  # samples 0 and 1 cached, three batches
    torch.testing.assert_close(partly.probs, everything.probs)


@pytest.mark.parametrize("batches, cached", [(1, False), (2, True)])
def test_one_batch_keeps_no_sample_and_several_batches_cache_them(batches, cached):
    """A tensor predicted in one batch uses each sample once: it is freed after use (at most three
    are alive: the first, kept for the head check, and the two latest); with two batches all five
    are drawn once and kept for the second batch."""
    post = table()
    x = torch.randn(8, 3)
    drawn, alive_at_draw = [], []
    original = post.sample

    def sample(i):
        alive_at_draw.append(sum(ref() is not None for ref in drawn))
        out = original(i)
        drawn.append(weakref.ref(next(iter(out.values()))))
        return out

    post.sample = sample
    got = predict(post, x, pred_type="nn", num_samples=5, compile=False, batch_size=8 // batches)
    assert len(drawn) == 5  # each sample drawn once either way
    assert (max(alive_at_draw) == 4) if cached else (max(alive_at_draw) <= 3)
    post.sample = original
    torch.testing.assert_close(got.probs, predict(post, x, pred_type="nn", num_samples=5, compile=False).probs)


def test_vi_and_batchnorm_model_predict_in_eval_mode_with_the_posteriors_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    post = VI(model, init_std=0.1, num_data=20, seed=4).train()
    post.loss(torch.randn(16, 3) * 2 + 1, torch.randint(0, 2, (16,))).backward()  # moves the running stats
    x = torch.randn(5, 3)
    pred = predict(post, x, pred_type="nn", num_samples=4, compile=False)
    assert post.training and model.training  # modes restored
    model.eval()
    expected = torch.stack(
        [functional_call(model, {**post.fixed_tensors(), **post.sample(s)}, (x,)).softmax(-1) for s in range(4)]
    ).mean(0)
    torch.testing.assert_close(pred.probs, expected)


def test_mc_dropout_posterior_is_predicted_through_the_protocol():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    post = MCDropout(model, p=0.5, num_data=10, seed=1)
    x = torch.randn(4, 3)
    pred = predict(post, x, pred_type="nn", num_samples=3, compile=False, return_logits=True)
    for s in range(3):
        torch.testing.assert_close(
            pred.logits[s], functional_call(model, {**post.fixed_tensors(), **post.sample(s)}, (x,))
        )
    assert (pred.mutual_info > 0).all()


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_samples": 0}, "num_samples"), ({"batch_size": 0}, "batch_size"), ({"likelihood": "poisson"}, "likelihood")],
)
def test_bad_arguments_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        predict(table(), torch.randn(2, 3), **{"compile": False, **kwargs})


def test_empty_inputs_are_an_error():
    with pytest.raises(ValueError, match="no batch"):
        predict(table(), [], pred_type="nn", num_samples=2, compile=False)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(loop, "_compiled", lambda module: broken)
    post = table()
    x = torch.randn(6, 3)
    with pytest.warns(RuntimeWarning, match="predicting eagerly"):
        pred = predict(post, x, pred_type="nn", num_samples=5, compile=True)
    torch.testing.assert_close(pred.probs, predict(post, x, pred_type="nn", num_samples=5, compile=False).probs)


def test_compiled_and_eager_predictions_agree_and_compile_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    post = VI(model, init_std=0.2, num_data=10, seed=2)
    x = torch.randn(12, 4)
    eager = predict(post, x, pred_type="nn", num_samples=6, compile=False, return_logits=True)
    from torch._dynamo.utils import counters

    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
        compiled = predict(post, x, pred_type="nn", num_samples=6, compile=True, return_logits=True)
        again = predict(post, x, pred_type="nn", num_samples=6, compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all samples and both calls
    for key in ("logits", "probs", "entropy", "expected_entropy", "mutual_info"):
        torch.testing.assert_close(getattr(compiled, key), getattr(eager, key), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.probs, eager.probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "num_samples, sample_bytes, expected",
    [
        (32, 1000, 32),
        (32, 500_000, 8),
        (32, 7 << 20, 1),
        (6, 0, 6),
        (7, 20 << 20, 1),
        (100, 10, 25),
        (64, 10, 32),
    ],
)
def test_chunk_size_divides_the_samples_within_the_limits(num_samples, sample_bytes, expected):
    assert loop._chunk_size(num_samples, sample_bytes) == expected


@pytest.mark.parametrize("chunk_bytes, samples_per_call", [(1 << 20, 6), (100, 2), (40, 1)])
def test_compiled_predict_runs_a_chunk_of_samples_per_call(monkeypatch, chunk_bytes, samples_per_call):
    """Each compiled call gets K samples (all six when they fit in CHUNK_BYTES, else a divisor of six:
    the samples take 48 bytes each); the summaries equal the eager loop's."""
    calls = []

    def counting(module, params, *args):
        calls.append(len(params))
        return loop._forward_chunk(module, params, *args)

    monkeypatch.setattr(loop, "_compiled", lambda module: counting)  # the chunking, without compiling
    monkeypatch.setattr(loop, "CHUNK_BYTES", chunk_bytes)
    post, x = table(num_samples=6), torch.randn(10, 3)
    chunked = predict(post, x, pred_type="nn", num_samples=6, compile=True, batch_size=5, return_logits=True)
    assert calls == [samples_per_call] * (2 * 6 // samples_per_call)
    eager = predict(post, x, pred_type="nn", num_samples=6, compile=False, batch_size=5, return_logits=True)
    for key in ("logits", "probs", "entropy", "expected_entropy", "mutual_info"):
        torch.testing.assert_close(getattr(chunked, key), getattr(eager, key))


class Counted(nn.Module):
    """A body that counts its forwards, then a head; ``after`` post-processes the head's output."""

    def __init__(self, after: str = "none") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 8) if after == "head twice" else nn.Linear(8, 3)
        self.after, self.body_calls = after, 0
        self.body.register_forward_hook(lambda *_: setattr(self, "body_calls", self.body_calls + 1))

    def forward(self, x):
        h = self.body(x)
        if self.after == "head weight in body":
            h = h + self.head.weight.sum()
        out = self.head(h)
        if self.after == "scaled":
            return out * 2
        if self.after == "in place":
            return out.mul_(2)
        if self.after == "head twice":
            return self.head(torch.tanh(out))
        return out


def full_forwards(post, x, num_samples):
    post.model.eval()
    return torch.stack(
        [functional_call(post.model, {**post.fixed_tensors(), **post.sample(s)}, (x,)) for s in range(num_samples)]
    )


@pytest.mark.parametrize("compile", [False, True])
def test_a_last_layer_posterior_runs_the_body_once_per_batch(compile):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Counted()
    post = VI(model, init_std=0.3, num_data=10, params="last_layer", seed=3)
    with torch.no_grad():  # the body's point estimates now differ from the model's own weights
        for name, p in post.named_parameters():
            if name.startswith("point."):
                p.add_(0.5)
    x = torch.randn(10, 4)
    expected = full_forwards(post, x, 6)
    model.body_calls = 0
    pred = predict(post, x, pred_type="nn", num_samples=6, compile=compile, batch_size=5, return_logits=True)
    assert model.body_calls == 2  # once per batch, not once per sample
    torch.testing.assert_close(pred.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.probs, expected.softmax(-1).mean(0), rtol=1e-5, atol=1e-6)


FAILED_HEAD_CHECK = {
    "scaled": "the model does not return its output as it is",
    "in place": "the model modifies its output in place",
    "head twice": "it ran 2 times in one forward",
    "head weight in body": "its inputs depend on the random tensors",
}


@pytest.mark.parametrize("after", ["scaled", "in place", "head twice", "head weight in body"])
def test_the_whole_network_runs_per_sample_when_the_head_output_is_not_the_models(after):
    """... and the failed check warns once per call (not once per batch), naming the condition."""
    torch.manual_seed(0)
    model = Counted(after)
    post = VI(model, init_std=0.3, num_data=10, params=["head.weight", "head.bias"], seed=3)
    x = torch.randn(10, 4)
    expected = full_forwards(post, x, 4)
    model.body_calls = 0
    with pytest.warns(RuntimeWarning, match="last-layer prediction") as record:
        pred = predict(post, x, pred_type="nn", num_samples=4, compile=False, return_logits=True, batch_size=5)
    assert model.body_calls == 1 + 4 + 4  # the failed check on the first batch, then one per sample
    torch.testing.assert_close(pred.logits, expected)
    messages = [str(w.message) for w in record if "last-layer prediction" in str(w.message)]
    assert messages == [
        f"last-layer prediction: 'head' holds every random tensor but {FAILED_HEAD_CHECK[after]}; "
        "running the whole network per sample"
    ]
    assert record[0].filename == __file__  # attributed to the caller of predict


def test_a_passing_last_layer_check_does_not_warn():
    post = VI(Counted(), init_std=0.3, num_data=10, params="last_layer", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        predict(post, torch.randn(6, 4), pred_type="nn", num_samples=3, compile=False, batch_size=3)


def test_a_posterior_over_the_whole_network_runs_it_per_sample():
    torch.manual_seed(0)
    model = Counted()
    post = VI(model, init_std=0.3, num_data=10, seed=3)
    x = torch.randn(5, 4)
    model.body_calls = 0
    pred = predict(post, x, pred_type="nn", num_samples=4, compile=False, return_logits=True)
    assert model.body_calls == 4
    torch.testing.assert_close(pred.logits, full_forwards(post, x, 4))


def test_a_last_layer_laplace_posterior_runs_the_body_once():
    torch.manual_seed(0)
    model = Counted()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    la = DiagLaplace(model, params="last_layer", prior_precision=0.5, seed=1).fit([(x, y)], progress=False)
    assert set(la.sample(0)) == {"head.weight", "head.bias"}
    expected = full_forwards(la, x, 5)
    model.body_calls = 0
    pred = predict(la, x, pred_type="nn", num_samples=5, compile=False, return_logits=True)
    assert model.body_calls == 1
    torch.testing.assert_close(pred.logits, expected)


# -- compiled functions, one per model --------------------------------------------------------------


def test_each_model_gets_its_own_compiled_function_dropped_with_the_model():
    torch._dynamo.reset()
    posts = [table(seed=0), table(seed=1)]
    x = torch.randn(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for post in posts:
            predict(post, x, pred_type="nn", num_samples=5, compile=True)
    first, second = (loop._COMPILED[post.model] for post in posts)
    assert first is not second
    assert loop._compiled(posts[0].model) is first  # cached: the next predict reuses it
    gc.collect()  # models of earlier tests leave the cache now, not during the count below
    held = len(loop._COMPILED)
    model = weakref.ref(posts[0].model)
    del posts[0], first
    gc.collect()
    assert model() is None
    assert len(loop._COMPILED) == held - 1


def test_reaching_the_recompile_limit_warns_instead_of_running_eagerly_in_silence():
    torch._dynamo.reset()
    post, x = table(), torch.randn(6, 3)
    with torch._dynamo.config.patch(recompile_limit=1):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            predict(post, x, pred_type="nn", num_samples=5, compile=True)  # the model's one compilation: a chunk of 5
        with pytest.warns(RuntimeWarning, match="torch.compile failed .*predicting eagerly") as record:
            pred = predict(post, x, pred_type="nn", num_samples=4, compile=True)  # a chunk of 4 would recompile
    assert sum("predicting eagerly" in str(w.message) for w in record) == 1
    torch.testing.assert_close(pred.probs, predict(post, x, pred_type="nn", num_samples=4, compile=False).probs)


# -- what inputs means --------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(3, 4), nn.Parameter(torch.ones(4))

    def forward(self, x, shift):
        return self.lin(x) * self.scale + shift


def test_a_tuple_is_one_calls_positional_inputs_and_a_list_holds_batches():
    torch.manual_seed(0)
    post = VI(TwoInputs(), init_std=0.3, num_data=10, seed=2)
    x, shift, y = torch.randn(8, 3), torch.randn(8, 4), torch.zeros(8)
    pred = predict(post, (x, shift), pred_type="nn", num_samples=3, compile=False, return_logits=True)
    post.model.eval()
    expected = torch.stack(
        [functional_call(post.model, {**post.fixed_tensors(), **post.sample(s)}, (x, shift)) for s in range(3)]
    )
    torch.testing.assert_close(pred.logits, expected)
    split = predict(post, (x, shift), pred_type="nn", num_samples=3, compile=False, return_logits=True, batch_size=3)
    loader = [((x[:5], shift[:5]), y[:5]), ((x[5:], shift[5:]), y[5:])]  # (inputs, targets) batches
    from_loader = predict(post, loader, pred_type="nn", num_samples=3, compile=False, return_logits=True)
    for other in (split, from_loader):
        torch.testing.assert_close(other.logits, expected)


@pytest.mark.parametrize(
    "inputs, found",
    [(((torch.randn(2, 3),), (torch.randn(2, 3),)), r"\(tuple, tuple\)"), ((), r"\(nothing\)")],
)
def test_a_tuple_holding_no_tensor_is_rejected_naming_inputs(inputs, found):
    with pytest.raises(ValueError, match=rf"^inputs: a tuple is one call's positional inputs.*{found}.*a list"):
        predict(table(), inputs, pred_type="nn", num_samples=2, compile=False)


def test_inputs_neither_a_batch_nor_iterable_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"^inputs: a int is neither one batch"):
        predict(table(), 3, pred_type="nn", num_samples=2, compile=False)


# -- the protocol: what predict reads -----------------------------------------------------------------


class ShardedTable(TableOfSamples):
    """A stand-in for a sharded posterior: predicted through ``functional_forward`` alone."""

    is_sharded = True

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(weights)
        self.forwards = 0

    def functional_forward(self, weights, inputs):
        self.forwards += 1
        return super().functional_forward(weights, inputs)


def test_a_sharded_posterior_is_predicted_through_functional_forward():
    post = ShardedTable(table().weights)
    assert isinstance(post, Posterior)
    x = torch.randn(7, 3)
    with pytest.warns(RuntimeWarning, match="vectorize=True: a sharded posterior") as record:
        pred = predict(post, x, pred_type="nn", num_samples=5, vectorize=True, return_logits=True, batch_size=4)
    assert len(record) == 1
    assert post.forwards == 2 * 5
    torch.testing.assert_close(pred.logits, torch.einsum("nf,scf->snc", x, post.weights))


def test_the_posteriors_output_fn_and_noise_are_read_unless_given():
    post = table(num_samples=4, classes=2, likelihood="regression")
    post.output_fn = lambda out, inputs: 2 * out
    post.noise_std = 0.5
    x = torch.randn(5, 3)
    pred = predict(post, x, pred_type="nn", num_samples=4, compile=False)
    outs = 2 * torch.einsum("nf,scf->snc", x, post.weights)
    torch.testing.assert_close(pred.mean, outs.mean(0))
    torch.testing.assert_close(pred.variance, outs.var(0, unbiased=False) + 0.25)
    given = predict(
        post, x, pred_type="nn", num_samples=4, compile=False, output_fn=lambda out, inputs: out, noise_std=0.0
    )
    torch.testing.assert_close(given.mean, outs.mean(0) / 2)


def test_a_posterior_missing_what_predict_reads_is_rejected_naming_the_members():
    class Bare:
        def __init__(self) -> None:
            self.model, self.names = nn.Linear(3, 2), ["weight"]
            self.likelihood, self.noise_std = "classification", 0.0

        def sample(self, index):
            return {"weight": torch.zeros(2, 3)}

        def fixed_tensors(self):
            return {}

    with pytest.raises(TypeError, match=r"^posterior: a Bare has no output_fn, is_sharded, pred_type; .*Posterior"):
        predict(Bare(), torch.randn(2, 3), pred_type="nn", num_samples=2, compile=False)
