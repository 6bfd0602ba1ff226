"""Issue 18: every method inside ``transformers.Trainer`` (``bayeskern.integrations.transformers``).

Oracles: the same update written by hand (one full-batch SGD step on ``posterior.loss``), runs resumed
from a Trainer checkpoint against the uninterrupted run (bitwise), ``DiagLaplace`` fitted by hand on the
same data, and ``bayeskern.predict`` + ``bayeskern.metrics`` called directly.  Tiny LLaMA classifiers
with LoRA adapters (``hf_models``), CPU only, nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_models import llama_classifier, text_batch, with_lora
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments, default_data_collator
from transformers import logging as hf_logging

import bayeskern as bk
from bayeskern.integrations.transformers import METRICS, POSTERIOR_FILE, BayesTrainer

hf_logging.set_verbosity_error()
N_TRAIN, N_EVAL = 16, 12


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    batch = text_batch(n, seed=seed)
    return [{key: value[i] for key, value in batch.items()} for i in range(n)]


TRAIN, EVAL = examples(N_TRAIN, 0), examples(N_EVAL, 1)
TRAINER_OPTIONS = ("optimizers", "posterior", "num_samples")


def lora_model(dropout: float = 0.0):
    return with_lora(llama_classifier(), ["q_proj", "v_proj"], dropout=dropout)


def trainer(model, directory, **options) -> BayesTrainer:
    """A BayesTrainer on TRAIN / EVAL; ``options`` are TrainingArguments except TRAINER_OPTIONS."""
    extra = {key: options.pop(key) for key in TRAINER_OPTIONS if key in options}
    settings = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    args = TrainingArguments(str(directory), **{**settings, **options})
    return BayesTrainer(
        model, args, train_dataset=TRAIN, eval_dataset=EVAL, data_collator=default_data_collator, **extra
    )


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class Recorder(TrainerCallback):
    """Copies of ``state()`` after each optimizer step, by step."""

    def __init__(self, state):
        self.state, self.seen = state, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.seen[state.global_step] = {k: v.detach().clone() for k, v in self.state().items()}
        return control


def sgld_trainer(directory, *, temperature=1.0, **options):
    """LoRA adapters and head under BayesSGLD with a bank of the adapters (burn-in 1, thin 2), LoRA dropout
    on; returns the untrained ``(trainer, model, bank)``."""
    model = lora_model(dropout=0.1)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sgld = bk.BayesSGLD(named, lr=1e-3, num_data=N_TRAIN, temperature=temperature, seed=5)
    bank = bk.SampleBank(model, params="lora", burnin=1, thin=2, seed=0)
    run = trainer(model, directory, optimizers=(sgld, constant(sgld)), posterior=bank, max_grad_norm=0, **options)
    return run, model, bank


@pytest.mark.slow
def test_vi_step_is_sgd_on_posterior_loss(tmp_path):
    """One full-batch step through the Trainer equals SGD on ``posterior.loss`` written by hand."""
    post, reference, start = (bk.VI(lora_model(), params="lora", num_data=N_TRAIN, seed=3) for _ in range(3))
    sgd = torch.optim.SGD(post.parameters(), lr=0.1)
    run = trainer(
        post,
        tmp_path,
        optimizers=(sgd, constant(sgd)),
        per_device_train_batch_size=N_TRAIN,
        max_steps=1,
        max_grad_norm=0,
    )
    run.train()
    reference.loss(default_data_collator(TRAIN)).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    got, want, before = post.state_dict(), reference.state_dict(), start.state_dict()
    assert torch.equal(got["rng_state"], want["rng_state"])
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(got[k], before[k]) for k in got if k.startswith(("mu.", "rho.")))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vi", "mc_dropout"])
def test_checkpoint_resume_restores_posterior_bitwise(tmp_path, method):
    """Save at step 2 and resume in a fresh Trainer: the checkpoint is the posterior's state dict at step 2
    exactly, and the resumed run ends where the uninterrupted one does, bit for bit (LoRA dropout on)."""

    def build():
        options = dict(params="lora", num_data=N_TRAIN, seed=1)
        model = lora_model(dropout=0.1)
        return bk.VI(model, **options) if method == "vi" else bk.MCDropout(model, p=0.2, **options)

    whole, resumed = build(), build()
    run = trainer(whole, tmp_path / "a", save_strategy="steps", save_steps=2)
    recorder = Recorder(whole.state_dict)
    run.add_callback(recorder)
    run.train()
    saved = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == recorder.seen[2].keys()
    assert all(torch.equal(saved[k], recorder.seen[2][k]) for k in saved)
    trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = whole.state_dict(), resumed.state_dict()
    assert int(got["rng_state"][1]) == 4
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_sgld_bank_counts_optimizer_steps_and_resumes_bitwise(tmp_path):
    """With gradient accumulation 2 the bank sees one update per optimizer step (burn-in 1, thin 2 over 5
    steps keeps the iterates after steps 3 and 5, bitwise the adapters then); resuming from the step-2
    checkpoint restores the bank and the chain, so both runs end bit for bit alike."""
    options = dict(max_steps=5, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
    run, model, bank = sgld_trainer(tmp_path / "a", **options)
    recorder = Recorder(lambda: {n: p for n, p in model.named_parameters() if n in bank.names})
    run.add_callback(recorder)
    run.train()
    assert (bank.num_updates, len(bank)) == (5, 2)
    for kept, step in zip(bank._samples, (3, 5)):
        assert all(torch.equal(kept[n], recorder.seen[step][n]) for n in bank.names)
    assert (tmp_path / "a" / "checkpoint-2" / POSTERIOR_FILE).exists()

    again, model_again, bank_again = sgld_trainer(tmp_path / "b", **options)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert (bank_again.num_updates, len(bank_again)) == (5, 2)
    for x, y in zip(bank._samples, bank_again._samples):
        assert all(torch.equal(x[n], y[n]) for n in bank.names)
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in model_again.named_parameters() if p.requires_grad)


def ivon_trainer(directory, **options):
    """LoRA adapters and head under IVON; returns the untrained ``(trainer, model, ivon)``."""
    model = lora_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ivon = bk.IVON(named, lr=0.05, num_data=N_TRAIN, hess_init=100.0, seed=7)
    return trainer(model, directory, optimizers=(ivon, constant(ivon)), **options), model, ivon


@pytest.mark.slow
def test_ivon_takes_one_sample_per_optimizer_step_over_the_accumulated_batch(tmp_path):
    """Gradient accumulation 2 over halves of the train set: each optimizer step is, to float rounding,
    the hand-written step on the whole set at one sample; ``evaluate`` predicts with IVON's posterior."""
    run, model, ivon = ivon_trainer(
        tmp_path, per_device_train_batch_size=N_TRAIN // 2, gradient_accumulation_steps=2, max_steps=2, max_grad_norm=0
    )
    run.train()
    reference = lora_model()
    named = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    by_hand = bk.IVON(named, lr=0.05, num_data=N_TRAIN, hess_init=100.0, seed=7)
    batch = default_data_collator(TRAIN)
    for _ in range(2):
        with by_hand.sampled_params(train=True):
            by_hand.zero_grad()
            reference(**batch).loss.backward()
        by_hand.step()
    want = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name].detach(), rtol=1e-5, atol=1e-6)
    assert ivon.param_groups[0]["step"] == 2 and ivon.param_groups[0]["draws"] == 2
    results = run.evaluate()
    assert all(0 <= results[f"eval_{name}"] < float("inf") for name in METRICS)


@pytest.mark.slow
def test_ivon_resumes_from_a_trainer_checkpoint_bitwise(tmp_path):
    options = dict(max_steps=4, save_strategy="steps", save_steps=2)
    run, model, _ = ivon_trainer(tmp_path / "a", **options)
    run.train()
    again, model_again, ivon_again = ivon_trainer(tmp_path / "b", **options)
    again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in model_again.named_parameters() if p.requires_grad)
    assert ivon_again.param_groups[0]["step"] == 4


def test_evaluate_reports_predictive_metrics(tmp_path):
    """``evaluate`` returns accuracy, ECE, NLL and Brier of ``bayeskern.predict`` on the eval set, under the
    prefix; without a posterior, of the model's softmax."""
    post = bk.VI(lora_model(), params="lora", num_data=N_TRAIN, init_std=0.05, seed=2)
    results = trainer(post, tmp_path, num_samples=3).evaluate(metric_key_prefix="test")
    eval_batch = default_data_collator(EVAL)
    probs = bk.predict(post, [eval_batch], num_samples=3, compile=False).probs
    report = bk.metrics.calibration_report(probs.double(), eval_batch["labels"])
    assert {k: v for k, v in results.items() if k != "epoch"}.keys() == {f"test_{m}" for m in METRICS}
    for name in METRICS:
        assert results[f"test_{name}"] == pytest.approx(report[name], rel=1e-6, abs=1e-9)

    model = lora_model()
    plain = trainer(model, tmp_path).evaluate()
    with torch.no_grad():
        logits = model.eval()(**{k: v for k, v in eval_batch.items() if k != "labels"}).logits
    assert plain["eval_nll"] == pytest.approx(
        bk.metrics.nll(logits.softmax(-1).double(), eval_batch["labels"]), rel=1e-6
    )


@pytest.mark.slow
def test_fit_laplace_matches_hand_fit_and_saves_with_model(tmp_path):
    """``fit_laplace`` after SGD training equals ``DiagLaplace.fit`` on the train set plus
    ``optimize_prior_precision(method="val_nll")`` on the eval set; ``save_model`` writes it beside the
    adapters and ``load_posterior`` restores it exactly."""
    run, model, _ = sgld_trainer(tmp_path, temperature=0.0, num_samples=4)
    run.train()
    grid = [0.01, 1.0, 100.0]
    laplace = run.fit_laplace(bk.DiagLaplace(model, params="lora", seed=4), grid=grid, num_samples=4)
    train_loader = DataLoader(TRAIN, 4, collate_fn=default_data_collator)
    by_hand = bk.DiagLaplace(model, params="lora", seed=4).fit(train_loader, progress=False)
    by_hand.optimize_prior_precision(
        method="val_nll", val_loader=DataLoader(EVAL, 8, collate_fn=default_data_collator), grid=grid, num_samples=4
    )
    assert laplace.num_data == N_TRAIN and laplace.prior_precision == by_hand.prior_precision
    for name, fisher in by_hand.fisher.items():
        torch.testing.assert_close(laplace.fisher[name], fisher, rtol=1e-5, atol=1e-9)
    assert run.posterior is laplace and "eval_nll" in run.evaluate()

    run.save_model(str(tmp_path / "final"))
    restored = bk.DiagLaplace(model, params="lora", seed=0)
    run.posterior = restored
    run.load_posterior(str(tmp_path / "final"))
    assert restored.prior_precision == laplace.prior_precision and restored.seed == 4
    assert all(torch.equal(restored.fisher[n], laplace.fisher[n]) for n in laplace.names)


def test_bad_input_names_the_argument(tmp_path):
    post = bk.VI(lora_model(), params="lora", num_data=N_TRAIN, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        trainer(post, tmp_path, num_samples=0)
    run = BayesTrainer(lora_model(), trainer(post, tmp_path).args, train_dataset=TRAIN)
    with pytest.raises(ValueError, match="eval_dataset"):
        run.fit_laplace(bk.DiagLaplace(run.model, params="lora", seed=0))
    with pytest.raises(ValueError, match="no checkpoint found"):
        run.train(resume_from_checkpoint=True)
