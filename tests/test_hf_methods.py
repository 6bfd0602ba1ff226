"""Issue 17: Hugging Face ``transformers`` models, with and without a peft LoRA wrapper, in every method.

Tiny models built from configs (``hf_models``; nothing is downloaded, CPU only): a LLaMA classifier, a
LLaMA causal LM scored on its answer tokens (``output_fn=answer_logits``), a RoBERTa classifier and a
ViT.  Batches are what ``transformers`` collators produce: Mappings of keyword inputs holding the
targets under ``labels``.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_models import (
    NUM_LABELS,
    answer_logits,
    image_batch,
    llama_causal_lm,
    llama_classifier,
    roberta_classifier,
    text_batch,
    vit_classifier,
    with_lora,
)

import bayeskern as bk
from bayeskern.posteriors.prior import mangle

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

N_DATA = 64


# -- models and batches ------------------------------------------------------------------------------
class Spec:
    """One tiny model: how to build it, its LoRA targets, its batches and its ``output_fn``."""

    def __init__(self, make, targets, task_type, batch, output_fn=None):
        self.make, self.targets, self.task_type = make, targets, task_type
        self.batch_fn, self.output_fn = batch, output_fn

    def model(self, lora: bool) -> nn.Module:
        model = self.make()
        if not lora:
            return model
        wrapped = with_lora(model, self.targets, task_type=self.task_type)
        if self.task_type is None:  # no task type, so no modules_to_save: train the fresh head directly
            wrapped.base_model.model.classifier.requires_grad_(True)
        return wrapped

    def batch(self, seed: int = 0, size: int = 4) -> dict[str, torch.Tensor]:
        return self.batch_fn(size=size, seed=seed)

    def loader(self, num_batches: int = 2, size: int = 4, seed: int = 0) -> DataLoader:
        """A DataLoader over single examples, collated into Mapping batches by the default collate."""
        examples = []
        for b in range(num_batches):
            batch = self.batch(seed=seed + b, size=size)
            examples += [{k: v[i] for k, v in batch.items()} for i in range(size)]
        return DataLoader(examples, batch_size=size, shuffle=False)

    def logits(self, output, inputs) -> torch.Tensor:
        return self.output_fn(output, inputs) if self.output_fn is not None else output.logits


SPECS = {
    "llama": Spec(llama_classifier, ["q_proj", "v_proj"], "SEQ_CLS", text_batch),
    "llama_lm": Spec(llama_causal_lm, ["q_proj", "v_proj"], "CAUSAL_LM", text_batch, answer_logits),
    "roberta": Spec(
        roberta_classifier, ["query", "value"], "SEQ_CLS", lambda size, seed: text_batch(size, seed, pad_token=1)
    ),
    "vit": Spec(vit_classifier, ["q_proj", "v_proj"], None, image_batch),
}
MODELS = list(SPECS)


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_model_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert now.keys() == before.keys()
    for name, tensor in now.items():
        assert torch.equal(tensor, before[name]), f"the model's {name} changed"


def state_copy(state) -> object:
    """A deep copy of a (nested) state dict, tensors cloned."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: state_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(state_copy(v) for v in state)
    return state


def assert_same_state(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save_load(state) -> object:
    """``state`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if not p.requires_grad]


WEIGHT_METHODS = {
    "vi": lambda model, **kw: bk.VI(model, num_data=N_DATA, init_std=1e-2, **kw),
    "mcdropout": lambda model, **kw: bk.MCDropout(model, num_data=N_DATA, p=0.2, **kw),
}
SELECTIONS = {"lora": (True, "lora"), "full": (False, None), "last_layer": (False, "last_layer")}


def weight_posterior(method: str, spec: Spec, selection: str, seed: int = 0):
    lora, params = SELECTIONS[selection]
    model = spec.model(lora)
    return model, WEIGHT_METHODS[method](model, params=params, output_fn=spec.output_fn, seed=seed)


# -- VI and MC-dropout ----------------------------------------------------------------------------------
# LoRA with both methods; the full-weight and last-layer selections of the plain models with one each
CASES = [("lora", "vi"), ("lora", "mcdropout"), ("full", "vi"), ("last_layer", "mcdropout")]


@pytest.mark.parametrize("selection,method", CASES, ids=[f"{s}-{m}" for s, m in CASES])
@pytest.mark.parametrize("name", MODELS)
def test_weight_posterior_loss_forms_and_training_step(name, selection, method):
    spec = SPECS[name]
    model, post = weight_posterior(method, spec, selection)
    selected = bk.select_parameters(model, SELECTIONS[selection][1])
    assert post.names == selected
    before = snapshot(model)
    batch = spec.batch()

    # the three forms of one loss agree: Mapping batch with labels, (inputs, targets), forward (DDP form)
    post.eval()
    rng = post.rng_state.clone()
    from_mapping = post.loss(batch)
    post.rng_state.copy_(rng)
    from_pair = post.loss(inputs_of(batch), batch["labels"])
    post.rng_state.copy_(rng)
    from_forward = post(batch)
    assert torch.isfinite(from_mapping)
    torch.testing.assert_close(from_mapping, from_pair, rtol=0, atol=0)
    torch.testing.assert_close(from_forward, from_pair, rtol=0, atol=0)
    # without labels, forward returns the model's output as it is
    out = post(inputs_of(batch))
    assert spec.logits(out, inputs_of(batch)).shape[0] == len(batch["labels"])

    # the posterior's parameters: the variational tensors of the selected weights and the model's
    # other *trainable* parameters (point estimates); frozen base weights are read, never copied
    points = [n for n in trainable_names(model) if n not in selected]
    expected_params = {f"{store}.{mangle(n)}" for store in post.variational for n in selected}
    expected_params |= {f"point.{mangle(n)}" for n in points}
    assert {k for k, _ in post.named_parameters()} == expected_params
    buffers = {f"buffers_.{mangle(n)}" for n, _ in model.named_buffers()}
    priors = {f"prior.{mangle(n)}" for n in selected}
    state = post.state_dict()
    assert set(state) <= expected_params | buffers | priors | {"rng_state", "rho_scale"}
    for key in state:
        name_part = key.split(".", 1)[-1]
        for frozen in frozen_names(model):
            assert name_part != mangle(frozen), f"frozen base weight {frozen} copied into the posterior as {key}"
    params = dict(model.named_parameters())
    if selection == "lora":
        assert not set(selected) & set(frozen_names(model))
        adapter = sum(params[n].numel() for n in selected)
        heads = sum(params[n].numel() for n in points)
        buffer_numel = sum(b.numel() for _, b in model.named_buffers())
        held = sum(t.numel() for t in state.values())
        scalars = 3  # rng_state (2) and, for VI, rho_scale (1)
        assert held <= (len(post.variational) + 1) * adapter + heads + buffer_numel + scalars
        assert held < sum(p.numel() for p in model.parameters() if not p.requires_grad)

    # one training step (Adam on post.parameters()) moves only the posterior's trainable tensors
    post.train()
    assert model.training
    start = state_copy(post.state_dict())
    opt = torch.optim.Adam(post.parameters(), lr=1e-2)
    loss = post.loss(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = post.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed <= expected_params | {"rng_state"}, changed - expected_params
    assert "rng_state" in changed
    assert changed & {f"{post.variational[-1]}.{mangle(n)}" for n in selected}, "no variational tensor moved"
    moved_points = {f"point.{mangle(n)}" for n in points} & changed
    assert not points or moved_points, "no point estimate moved"
    assert_model_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters()), "a gradient reached the model's own parameters"


# -- SGLD and the sample bank ------------------------------------------------------------------------------
def sgld_run(spec: Spec, steps: int, seed: int = 0):
    model = spec.model(lora=True)
    model.train()
    opt = bk.BayesSGLD(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-3, num_data=N_DATA, seed=seed
    )
    bank = bk.SampleBank(model, params="lora", output_fn=spec.output_fn, seed=seed)
    return model, opt, bank


def sgld_step(model, opt, bank, spec: Spec, batch) -> None:
    inputs = inputs_of(batch)
    loss = F.cross_entropy(spec.logits(model(**inputs), inputs), batch["labels"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    bank.update()


@pytest.mark.parametrize("name", MODELS)
def test_sgld_with_sample_bank_on_lora(name):
    spec = SPECS[name]
    model, opt, bank = sgld_run(spec, steps=2)
    trainable = set(trainable_names(model))
    for step in range(2):
        before = snapshot(model)
        sgld_step(model, opt, bank, spec, spec.batch(seed=step))
        now = snapshot(model)
        changed = {n for n in now if not torch.equal(now[n], before[n])}
        assert changed <= trainable, changed - trainable
        assert changed >= set(bk.select_parameters(model, "lora")), "an adapter did not move"
    assert len(bank) == 2
    lora = bk.select_parameters(model, "lora")
    assert list(bank.sample(0)) == lora
    assert list(bank.mean()) == lora

    # checkpoints: the optimizer state and the bank through torch.save / torch.load(weights_only=True)
    opt_state, bank_state = save_load(opt.state_dict()), save_load(bank.state_dict())
    model_state = save_load({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    fresh_model, fresh_opt, fresh_bank = sgld_run(spec, steps=0, seed=123)
    with torch.no_grad():
        for n, p in fresh_model.named_parameters():
            if n in model_state:
                p.copy_(model_state[n])
    fresh_opt.load_state_dict(opt_state)
    fresh_bank.load_state_dict(bank_state)
    for i in range(2):
        assert_same_state(fresh_bank.sample(i), bank.sample(i))
    batch = spec.batch(seed=7)
    torch.manual_seed(5)  # the same LoRA dropout masks in both runs
    sgld_step(model, opt, bank, spec, batch)
    torch.manual_seed(5)
    sgld_step(fresh_model, fresh_opt, fresh_bank, spec, batch)
    assert_same_state(snapshot(fresh_model), snapshot(model))  # same noise, same prior mean, same step
    assert_same_state(fresh_bank.sample(2), bank.sample(2))


# -- Laplace ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_laplace_fit_and_val_nll_on_lora(name):
    spec = SPECS[name]
    model = spec.model(lora=True)
    before = snapshot(model)
    la = bk.DiagLaplace(model, params="lora", output_fn=spec.output_fn, seed=0)
    la.fit(spec.loader(), progress=False)
    lora = bk.select_parameters(model, "lora")
    assert list(la.fisher) == lora and la.num_data == 8
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in la.fisher.values())
    assert any(f.sum() > 0 for f in la.fisher.values())
    chosen = la.optimize_prior_precision(
        method="val_nll", val_loader=spec.loader(seed=10), grid=[0.1, 10.0], num_samples=2
    )
    assert chosen in (0.1, 10.0) and la.prior_precision == chosen
    assert list(la.sample(0)) == lora
    assert_model_unchanged(model, before)


def test_laplace_last_layer_without_adapters():
    spec = SPECS["llama"]
    model = spec.model(lora=False)
    la = bk.DiagLaplace(model, params="last_layer", seed=0).fit(spec.loader(), progress=False)
    assert list(la.fisher) == ["score.weight"]
    la.optimize_prior_precision(method="val_nll", val_loader=spec.loader(seed=10), grid=[1.0, 10.0], num_samples=2)


# -- predict --------------------------------------------------------------------------------------------
def build_posterior(kind: str, spec: Spec, lora: bool = True, params="lora"):
    """A posterior of each kind over ``spec``'s model, trained / fitted a little so that its samples differ."""
    if kind in WEIGHT_METHODS:
        model = spec.model(lora)
        post = WEIGHT_METHODS[kind](model, params=params, output_fn=spec.output_fn, seed=0)
        opt = torch.optim.Adam(post.parameters(), lr=1e-2)
        post.train()
        loss = post.loss(spec.batch())
        loss.backward()
        opt.step()
        post.eval()
        return model, post
    if kind == "laplace":
        model = spec.model(lora)
        return model, bk.DiagLaplace(model, params=params, output_fn=spec.output_fn, seed=0).fit(
            spec.loader(), progress=False
        )
    model, opt, bank = sgld_run(spec, steps=0)
    for step in range(2):
        sgld_step(model, opt, bank, spec, spec.batch(seed=step))
    model.eval()
    return model, bank


POSTERIORS = ["vi", "mcdropout", "laplace", "bank"]


@torch.no_grad()
def eager_probs(post, model: nn.Module, loader, num_samples: int, spec: Spec) -> torch.Tensor:
    """The Monte-Carlo predictive written out: sample by sample, batch by batch."""
    was_training = model.training
    model.eval()
    fixed = post.fixed_tensors()
    out = []
    for batch in loader:
        inputs = inputs_of(batch)
        probs = [
            spec.logits(functional_call(model, {**fixed, **post.sample(s)}, (), inputs), inputs).softmax(-1)
            for s in range(num_samples)
        ]
        out.append(torch.stack(probs).mean(0))
    model.train(was_training)
    return torch.cat(out)


@pytest.mark.parametrize("kind", POSTERIORS)
@pytest.mark.parametrize("name", MODELS)
def test_predict_on_mapping_loader_matches_eager_loop(name, kind):
    spec = SPECS[name]
    model, post = build_posterior(kind, spec)
    before = snapshot(model)
    loader = spec.loader(seed=20)
    prediction = bk.predict(post, loader, pred_type="nn", num_samples=3, compile=False)
    assert prediction.probs.shape == (8, 4 if spec.output_fn is answer_logits else NUM_LABELS)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(prediction.probs, eager_probs(post, model, loader, 3, spec), rtol=1e-5, atol=1e-6)
    assert_model_unchanged(model, before)
    # the samples differ: the predictive is not that of one network
    assert not torch.equal(prediction.probs, eager_probs(post, model, loader, 1, spec))


@pytest.mark.parametrize("name", list(SPECS))
def test_glm_probit_on_lora_models_equals_the_per_example_jacobian_formula(name):
    """The linearised predictive of a LoRA Laplace (the default for a Laplace) on each tiny HF model:
    softmax(f* / sqrt(1 + pi/8 diag(J Sigma J^T))) with J from one jacrev per example."""
    spec = SPECS[name]
    model, post = build_posterior("laplace", spec)
    batch = next(iter(spec.loader(seed=20)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prediction = bk.predict(post, [batch])
    mean, std = post.mean(), post.std()
    frozen = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.eval()
    rows = []
    for i in range(len(batch["labels"])):
        one = {k: v[i : i + 1] for k, v in inputs.items()}

        def logits(theta, one=one):
            output = torch.func.functional_call(model, {**frozen, **theta}, (), one)
            return bk.batches.logits_of(output, one, spec.output_fn)[0]

        f_star = logits(mean)
        jac = torch.func.jacrev(logits)(mean)
        variance = sum((jac[n].double().square() * std[n].double().square()).flatten(1).sum(-1) for n in post.names)
        rows.append(torch.softmax(f_star / torch.sqrt(1 + math.pi / 8 * variance.float()), -1))
    torch.testing.assert_close(prediction.probs, torch.stack(rows), rtol=1e-4, atol=1e-5)
    assert prediction.mutual_info is None


@pytest.mark.parametrize("name", list(SPECS))
def test_glm_mc_link_on_lora_models_is_the_jacobian_times_the_sample(name):
    """The MC link's logits at sample s are f* + J (theta_s - theta*), J by reverse mode per example
    (the forward-mode products run attention through its math kernel)."""
    spec = SPECS[name]
    model, post = build_posterior("laplace", spec)
    batch = next(iter(spec.loader(seed=20)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prediction = bk.predict(post, [batch], link_approx="mc", num_samples=3, return_logits=True)
    mean = post.mean()
    frozen = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    model.eval()
    for i in range(len(batch["labels"])):
        one = {k: v[i : i + 1] for k, v in inputs.items()}

        def logits(theta, one=one):
            output = torch.func.functional_call(model, {**frozen, **theta}, (), one)
            return bk.batches.logits_of(output, one, spec.output_fn)[0]

        jac = torch.func.jacrev(logits)(mean)
        for s in range(3):
            delta = {n: post.sample(s)[n] - mean[n] for n in post.names}
            expected = logits(mean) + sum((jac[n] * delta[n]).flatten(1).sum(-1) for n in post.names)
            torch.testing.assert_close(prediction.logits[s, i], expected, rtol=1e-4, atol=1e-5)
    assert prediction.mutual_info is not None and (prediction.mutual_info >= 0).all()


@pytest.mark.parametrize("kind", ["vi", "laplace"])
def test_predict_without_adapters(kind):
    """Full-weight VI and last-layer Laplace on the plain (unwrapped) LLaMA classifier."""
    spec = SPECS["llama"]
    model, post = build_posterior(kind, spec, lora=False, params=None if kind == "vi" else "last_layer")
    loader = spec.loader(seed=20)
    prediction = bk.predict(post, loader, pred_type="nn", num_samples=2, compile=False)
    torch.testing.assert_close(prediction.probs, eager_probs(post, model, loader, 2, spec), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vectorize", [False, True])
def test_predict_loop_and_vectorised_match_eager_loop(vectorize):
    spec = SPECS["llama_lm"]
    model, post = build_posterior("vi", spec)
    loader = spec.loader(seed=20)
    prediction = bk.predict(post, loader, num_samples=3, compile=False, vectorize=vectorize, pred_type="nn")
    torch.testing.assert_close(prediction.probs, eager_probs(post, model, loader, 3, spec), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a cold torch.compile of a transformer takes about a minute on 2 CPU cores
def test_predict_compiled_matches_eager():
    spec = SPECS["llama"]
    _, post = build_posterior("vi", spec)
    batch = spec.batch(seed=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure falls back with a RuntimeWarning
        compiled = bk.predict(post, batch, num_samples=2, compile=True, vectorize=False, pred_type="nn")
    eager = bk.predict(post, batch, num_samples=2, compile=False, vectorize=False, pred_type="nn")
    torch.testing.assert_close(compiled.probs, eager.probs, rtol=1e-4, atol=1e-5)


# -- checkpoints -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vi", "mcdropout", "laplace"])
@pytest.mark.parametrize("name", ["llama_lm", "roberta"])
def test_checkpoint_round_trip(name, kind):
    spec = SPECS[name]
    model, post = build_posterior(kind, spec)
    state = save_load(post.state_dict())
    if kind == "laplace":
        fresh = bk.DiagLaplace(model, params="lora", output_fn=spec.output_fn, seed=99)
    else:
        fresh = WEIGHT_METHODS[kind](spec.model(lora=True), params="lora", output_fn=spec.output_fn, seed=99)
        fresh.eval()
    fresh.load_state_dict(state)
    for s in range(2):
        assert_same_state(fresh.sample(s), post.sample(s))
    assert_same_state(fresh.fixed_tensors(), post.fixed_tensors())
    batch = spec.batch(seed=30)
    a = bk.predict(post, batch, num_samples=2, compile=False)
    b = bk.predict(fresh, batch, num_samples=2, compile=False)
    torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)
    if kind != "laplace":  # training resumes identically: same noise stream
        post.train(), fresh.train()
        torch.manual_seed(5)  # the same LoRA dropout masks (the model's own dropout uses torch's generator)
        expected = post.loss(batch)
        torch.manual_seed(5)
        torch.testing.assert_close(fresh.loss(batch), expected, rtol=0, atol=0)


# -- bad input: one clear error, nothing trained or modified -------------------------------------------------
@pytest.mark.parametrize("method", list(WEIGHT_METHODS))
@pytest.mark.parametrize("name", ["llama_lm", "vit"])
def test_loss_without_labels_is_a_clear_error(name, method):
    spec = SPECS[name]
    model, post = weight_posterior(method, spec, "lora")
    before = snapshot(model)
    opt = torch.optim.Adam(post.parameters(), lr=1e-2)
    post.loss(spec.batch()).backward()
    opt.step()  # some optimizer state to compare
    state, opt_state = state_copy(post.state_dict()), state_copy(opt.state_dict())
    opt.zero_grad()
    with pytest.raises(ValueError, match="labels"):
        post.loss(inputs_of(spec.batch()))
    with pytest.raises(ValueError, match="labels"):
        post.loss(next(iter(spec.loader())) | {"labels": None})
    assert_same_state(post.state_dict(), state)
    assert_same_state(opt.state_dict(), opt_state)
    assert all(p.grad is None for p in post.parameters())
    assert_model_unchanged(model, before)


def test_laplace_fit_without_labels_is_a_clear_error():
    spec = SPECS["llama"]
    model = spec.model(lora=True)
    la = bk.DiagLaplace(model, params="lora", seed=0)
    unlabelled = [inputs_of(batch) for batch in spec.loader()]
    with pytest.raises(ValueError, match="labels"):
        la.fit(unlabelled, progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        _ = la.fisher  # nothing was fitted
    la.fit(spec.loader(), progress=False)
    fitted = state_copy(la.state_dict())
    with pytest.raises(ValueError, match="labels"):
        la.fit(unlabelled, progress=False)
    assert_same_state(la.state_dict(), fitted)  # the earlier fit stands
    with pytest.raises(ValueError, match="labels"):
        la.optimize_prior_precision(method="val_nll", val_loader=unlabelled, grid=[1.0])
    assert_same_state(la.state_dict(), fitted)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: bk.VI(m, params="lora", num_data=N_DATA),
        lambda m: bk.MCDropout(m, params="lora", num_data=N_DATA),
        lambda m: bk.DiagLaplace(m, params="lora"),
        lambda m: bk.SampleBank(m, params="lora"),
        lambda m: bk.GaussianPrior(m, params="lora"),
        lambda m: bk.select_parameters(m, "lora"),
    ],
    ids=["vi", "mcdropout", "laplace", "bank", "prior", "select"],
)
def test_lora_selection_without_adapters_is_a_clear_error(make):
    model = SPECS["roberta"].model(lora=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"LoRA|lora"):
        make(model)
    assert_model_unchanged(model, before)


def wrong_rows(output, inputs):
    """An ``output_fn`` returning one row for the whole batch."""
    return output.logits[:1] if output.logits.dim() == 2 else output.logits[:1, -1]


def every_position(output, inputs):
    """The classic mistake with a causal LM: the logits of every position, not of the answer's."""
    return output.logits


@pytest.mark.parametrize("output_fn", [wrong_rows, every_position], ids=["rows", "positions"])
def test_output_fn_of_the_wrong_shape_in_loss_is_a_clear_error(output_fn):
    spec = SPECS["llama_lm"]
    model = spec.model(lora=True)
    before = snapshot(model)
    post = bk.VI(model, params="lora", num_data=N_DATA, output_fn=output_fn, seed=0)
    opt = torch.optim.Adam(post.parameters(), lr=1e-2)
    params = state_copy(dict(post.named_parameters()))
    with pytest.raises(ValueError, match=r"output_fn.*shape"):
        post.loss(spec.batch())
    assert_same_state({n: p.detach() for n, p in post.named_parameters()}, params)
    assert opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in post.parameters())
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("output_fn", [wrong_rows, every_position], ids=["rows", "positions"])
def test_output_fn_of_the_wrong_shape_in_fit_is_a_clear_error(output_fn):
    spec = SPECS["llama_lm"]
    model = spec.model(lora=True)
    before = snapshot(model)
    la = bk.DiagLaplace(model, params="lora", output_fn=output_fn, seed=0)
    with pytest.raises(ValueError, match=r"output_fn.*shape"):
        la.fit(spec.loader(), progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        _ = la.fisher
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("output_fn", [wrong_rows, every_position], ids=["rows", "positions"])
def test_output_fn_of_the_wrong_shape_in_predict_is_a_clear_error(output_fn):
    spec = SPECS["llama_lm"]
    model = spec.model(lora=True)
    la = bk.DiagLaplace(model, params="lora", output_fn=answer_logits, seed=0).fit(spec.loader(), progress=False)
    before, mode = snapshot(model), model.training
    with pytest.raises(ValueError, match=r"output_fn.*shape"):
        bk.predict(la, spec.loader(), num_samples=2, compile=False, output_fn=output_fn)
    assert_model_unchanged(model, before)
    assert model.training == mode  # predict restored the model's mode


# -- inputs are moved to the model's device, in the dtypes a collator may give ----------------------------------
@pytest.mark.parametrize("name", ["llama", "roberta"])
def test_int32_inputs_and_explicit_cpu_device(name):
    spec = SPECS[name]
    model, post = weight_posterior("vi", spec, "lora")
    post.eval()
    batch = spec.batch()
    int32 = {k: (v.to(torch.int32) if k != "labels" else v).to("cpu") for k, v in batch.items()}
    rng = post.rng_state.clone()
    expected = post.loss(batch)
    post.rng_state.copy_(rng)
    torch.testing.assert_close(post.loss(int32), expected, rtol=0, atol=0)
    a = bk.predict(post, [batch], num_samples=2, compile=False).probs
    b = bk.predict(post, [int32], num_samples=2, compile=False).probs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    la = bk.DiagLaplace(model, params="lora", seed=0).fit([int32], progress=False)
    reference = bk.DiagLaplace(model, params="lora", seed=0).fit([batch], progress=False)
    assert_same_state(la.fisher, reference.fisher)
