"""The vectorised predictive path (``predict(..., vectorize=...)``): several samples per call under
``torch.func.vmap`` give the per-sample loop's results; the automatic choice; the fallback."""

import warnings

import pytest
import torch
from hf_models import answer_logits, llama_causal_lm, llama_classifier, text_batch, with_lora
from torch import nn

from bayeskern.posteriors import VI, DiagLaplace, MCDropout, SampleBank
from bayeskern.predictive import predict
from bayeskern.predictive import vectorized as vectorized_path

CLASSIFICATION = ("probs", "entropy", "expected_entropy", "mutual_info", "logits")
CLOSE = dict(rtol=1e-5, atol=1e-6)


def assert_same(got, expected, keys=CLASSIFICATION):
    for key in keys:
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), **CLOSE, msg=key)


def both(post, inputs, **kwargs):
    """The vectorised and the loop's prediction (eager loop: its results are the reference)."""
    options = {"num_samples": 6, "compile": False, "return_logits": True, "pred_type": "nn", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the loop
        vectorized = predict(post, inputs, vectorize=True, **options)
    return vectorized, predict(post, inputs, vectorize=False, **options)


def count_vmapped_calls(monkeypatch):
    calls = []
    original = vectorized_path._forward_vmapped

    def counting(module, base, stacked, *args):
        calls.append(next(iter(stacked.values())).shape[0])
        return original(module, base, stacked, *args)

    monkeypatch.setattr(vectorized_path, "_forward_vmapped", counting)
    return calls


def mlp(seed=0, norm=False, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 16)]
    layers += [nn.BatchNorm1d(16)] if norm else []
    layers += [nn.Tanh()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(16, 3)]
    return nn.Sequential(*layers)


# -- small networks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("params", ["last_layer", None])
def test_mlp_vectorized_equals_the_loop(monkeypatch, params):
    post = VI(mlp(), init_std=0.3, num_data=10, params=params, seed=3)
    x = torch.randn(10, 4)
    calls = count_vmapped_calls(monkeypatch)
    vectorized, loop = both(post, x, batch_size=5)
    assert calls == [6, 6]  # one call of all six samples per batch
    assert_same(vectorized, loop)


def test_regression_mean_and_variance_equal_the_loops():
    post = VI(mlp(), init_std=0.3, num_data=10, likelihood="regression", noise_std=0.3, seed=1)
    vectorized, loop = both(post, torch.randn(7, 4), num_samples=5)
    assert_same(vectorized, loop, ("mean", "variance", "logits"))


def test_batchnorm_and_dropout_in_eval_mode_run_under_vmap():
    model = mlp(norm=True, dropout=True)
    post = VI(model, init_std=0.3, num_data=20, seed=4).train()
    post.loss(torch.randn(16, 4) * 2 + 1, torch.randint(0, 3, (16,))).backward()  # moves the running stats
    vectorized, loop = both(post, torch.randn(5, 4))
    assert_same(vectorized, loop)
    assert post.training and model.training  # modes restored


def test_mc_dropout_over_a_batchnorm_network():
    post = MCDropout(mlp(norm=True), p=0.3, num_data=10, seed=2)
    vectorized, loop = both(post, torch.randn(6, 4))
    assert_same(vectorized, loop)


def test_output_fn_runs_under_vmap():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.scale = mlp(), nn.Parameter(torch.ones(3))  # random tensors outside ``net``: no head

        def forward(self, x):
            return {"scores": self.net(x) * self.scale, "features": x}

    post = VI(Dict(), init_std=0.3, num_data=10, seed=5, output_fn=lambda out, x: out["scores"][:, :2])
    vectorized, loop = both(post, torch.randn(5, 4))
    assert_same(vectorized, loop)
    assert vectorized.probs.shape == (5, 2)


def test_chunks_within_the_byte_budget_give_the_same_result(monkeypatch):
    post = VI(mlp(), init_std=0.3, num_data=10, seed=3)
    sample_bytes = sum(t.numel() * t.element_size() for t in post.sample(0).values())
    monkeypatch.setattr(vectorized_path, "VECTOR_BYTES", 4 * sample_bytes)
    calls = count_vmapped_calls(monkeypatch)
    x = torch.randn(8, 4)
    vectorized, loop = both(post, x, num_samples=10, batch_size=4)
    # the first call: four samples' random tensors fit; then the measured activations (the largest
    # sample-dependent output, 16 floats an example, times LIVE_FACTOR) leave room for one sample each
    activation = vectorized_path.LIVE_FACTOR * 4 * 16 * 4
    assert calls[0] == 4 and sum(calls) == 20
    assert calls[1:] == [max(1, vectorized_path.VECTOR_BYTES // (sample_bytes + activation))] * 16
    assert_same(vectorized, loop)


def test_activation_hooks_sit_on_the_modules_being_run_only(monkeypatch):
    """The vectorised path measures activations with forward hooks on the modules it runs, for the
    duration of the call: a module outside the model, called during the forward, is not hooked,
    and no process-wide hook is installed."""
    bystander = nn.Linear(4, 4)
    seen = []

    class Watching(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.scale = mlp(), nn.Parameter(torch.ones(3))  # random tensors outside ``net``: no head

        def forward(self, x):
            global_hooks = len(nn.modules.module._global_forward_hooks)
            seen.append((global_hooks, len(bystander._forward_hooks), len(self.net[0]._forward_hooks)))
            return self.net(x + 0 * bystander(x)) * self.scale

    post = VI(Watching(), init_std=0.3, num_data=10, seed=3)
    calls = count_vmapped_calls(monkeypatch)
    predict(post, torch.randn(5, 4), pred_type="nn", num_samples=4, compile=False, vectorize=True, batch_size=3)
    assert calls == [4, 4] and seen == [(0, 0, 1)] * 2  # one vectorised call per batch, hooked
    assert all(not m._forward_hooks for m in post.model.modules())  # removed after the call


@pytest.mark.parametrize(
    "num_samples, random_bytes, activation, expected",
    [
        (10, 1000, 0, 10),
        (10, 1 << 28, 0, 4),
        (10, 1 << 28, 1 << 28, 2),
        (10, 1 << 31, 0, 1),
        (3, 0, 0, 3),
    ],
)
def test_vector_chunk_fits_the_budget(num_samples, random_bytes, activation, expected):
    assert vectorized_path._vector_chunk(num_samples, random_bytes, activation) == expected


# -- the automatic choice ---------------------------------------------------------------------------


def test_the_automatic_choice_vectorizes_a_small_random_share_only():
    model_bytes = 100 << 20
    assert vectorized_path._vectorizes(10, model_bytes // 200, model_bytes)  # LoRA: half a percent
    assert vectorized_path._vectorizes(10, model_bytes // 8, model_bytes)
    assert not vectorized_path._vectorizes(10, model_bytes // 4, model_bytes)
    assert not vectorized_path._vectorizes(10, model_bytes, model_bytes)  # every weight random
    assert not vectorized_path._vectorizes(1, model_bytes // 200, model_bytes)  # one sample: nothing to share
    assert not vectorized_path._vectorizes(
        10, model_bytes // 200, model_bytes, activation_bytes=vectorized_path.VECTOR_BYTES
    )


def test_predict_chooses_the_loop_for_a_full_weight_posterior(monkeypatch):
    calls = count_vmapped_calls(monkeypatch)
    post = VI(mlp(), init_std=0.3, num_data=10, seed=3)
    predict(post, torch.randn(5, 4), pred_type="nn", num_samples=4, compile=False)
    assert calls == []


def test_bad_vectorize_is_rejected():
    post = VI(mlp(), init_std=0.3, num_data=10, seed=3)
    with pytest.raises(ValueError, match=r"^vectorize must be"):
        predict(post, torch.randn(2, 4), vectorize="yes", compile=False)


# -- the fallback -----------------------------------------------------------------------------------


class Branching(nn.Module):
    """Control flow on a sample-dependent value: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.out(h * 2 if h.sum() > 0 else h)


def test_a_model_vmap_cannot_run_falls_back_to_the_loop_with_one_warning():
    post = VI(Branching(), init_std=0.3, num_data=10, seed=3)
    x = torch.randn(6, 4)
    with pytest.warns(RuntimeWarning, match="vmap failed") as record:
        got = predict(
            post, x, pred_type="nn", num_samples=5, compile=False, vectorize=True, batch_size=3, return_logits=True
        )
    assert sum("vmap failed" in str(w.message) for w in record) == 1
    assert_same(
        got,
        predict(
            post, x, pred_type="nn", num_samples=5, compile=False, vectorize=False, batch_size=3, return_logits=True
        ),
    )


def test_an_output_of_the_wrong_shape_is_raised_not_taken_for_a_vmap_failure():
    post = VI(mlp(), init_std=0.3, num_data=10, seed=3, output_fn=lambda out, x: out[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match=r"output_fn gave logits of shape \(1, 3\)"):
            predict(post, torch.randn(4, 4), pred_type="nn", num_samples=3, compile=False, vectorize=True)


# -- Hugging Face models with LoRA ------------------------------------------------------------------


def lora_llama():
    return with_lora(llama_classifier(), ["q_proj", "v_proj"], dropout=0.1)


def loader():
    return [text_batch(4, seed=0), text_batch(3, seed=1)]  # Mappings with labels, as collators make them


def test_vi_over_lora_vectorizes_automatically_and_equals_the_loop(monkeypatch):
    post = VI(lora_llama(), params="lora", init_std=0.05, num_data=10, seed=1)
    random_bytes = sum(t.numel() * t.element_size() for t in post.sample(0).values())
    model_bytes = sum(t.numel() * t.element_size() for t in [*post.model.parameters(), *post.model.buffers()])
    assert vectorized_path._vectorizes(6, random_bytes, model_bytes)
    calls = count_vmapped_calls(monkeypatch)
    automatic = predict(post, loader(), pred_type="nn", num_samples=6, compile=False, return_logits=True)
    assert calls == [6, 6]  # one vectorised call per batch
    vectorized, loop = both(post, loader())
    assert_same(vectorized, loop)
    assert_same(automatic, loop)


def test_diag_laplace_over_lora_vectorized_equals_the_loop():
    la = DiagLaplace(lora_llama(), params="lora", prior_precision=1.0, seed=2).fit(loader(), progress=False)
    vectorized, loop = both(la, loader())
    assert_same(vectorized, loop)


def test_sample_bank_over_lora_vectorized_equals_the_loop():
    model = lora_llama()
    bank = SampleBank(model, params="lora", max_samples=4)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    torch.manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p in adapters:
                p.add_(0.05 * torch.randn_like(p))
        bank.update()
    vectorized, loop = both(bank, loader(), num_samples=4)
    assert_same(vectorized, loop)


def test_causal_lm_with_output_fn_over_lora_vectorized_equals_the_loop():
    model = with_lora(llama_causal_lm(), ["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    post = VI(model, params="lora", init_std=0.05, num_data=10, seed=1, output_fn=answer_logits)
    vectorized, loop = both(post, loader(), num_samples=4)
    assert_same(vectorized, loop)
    assert vectorized.probs.shape == (7, 4)
