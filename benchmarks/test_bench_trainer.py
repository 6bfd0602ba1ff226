"""The cost of running each method through ``transformers.Trainer`` (``bayeskern.integrations.transformers``)
against the plain LoRA ``Trainer`` run on the same tiny model, data and number of steps (issue 18).

The model: the two-layer LLaMA classifier of ``tests/hf_models.py`` shape (hidden 32, vocab 64, 3 labels)
wrapped by peft with LoRA r = 4 on ``q_proj, v_proj``; 64 training sequences of 7 tokens, batch 8,
``BAYESKERN_BENCH_TRAINER_STEPS`` optimizer steps (default 20).  One measured call is one whole run: build
the model and the Trainer, ``train()``.  The group ``Trainer run tiny LoRA LLaMA <steps> steps``:

* ``plain Trainer`` (the baseline): ``transformers.Trainer`` on the PeftModel (AdamW, the model's loss);
* ``VI`` / ``MC-dropout``: ``BayesTrainer`` on ``VI`` / ``MCDropout(params="lora")`` (AdamW on the
  posterior's parameters, ``posterior.loss``);
* ``SGLD + bank``: ``BayesTrainer`` with ``optimizers=(BayesSGLD, constant schedule)`` and a
  ``SampleBank`` of the adapters fed every step;
* ``Laplace fit``: the plain run, then ``BayesTrainer.fit_laplace`` (diagonal Fisher over the train set and
  ``optimize_prior_precision(method="val_nll")`` over 5 values on 32 eval sequences, 8 samples each).

No evaluation in any run.  Each method is also timed alternately with the baseline
(``interleaved_ratio``, ``cases.interleaved_ratio``): on a shared CPU that ratio is the number to read.
"""

from __future__ import annotations

import os
import sys

import cases
import pytest
import torch
from bench_utils import QUICK, record

pytest.importorskip("transformers")
pytest.importorskip("peft")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from hf_models import llama_classifier, text_batch, with_lora
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers import logging as hf_logging

import bayeskern as bk
from bayeskern.integrations.transformers import BayesTrainer

hf_logging.set_verbosity_error()
STEPS = int(os.environ.get("BAYESKERN_BENCH_TRAINER_STEPS", "2" if QUICK else "20"))
N_TRAIN, N_EVAL, BATCH = 64, 32, 8
GROUP = f"Trainer run tiny LoRA LLaMA {STEPS} steps"


def _examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    batch = text_batch(n, seed=seed)
    return [{key: value[i] for key, value in batch.items()} for i in range(n)]


TRAIN, EVAL = _examples(N_TRAIN, 0), _examples(N_EVAL, 1)


def _args(directory: str, **options) -> TrainingArguments:
    return TrainingArguments(
        directory,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=N_EVAL,
        max_steps=STEPS,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **options,
    )


def _lora():
    return with_lora(llama_classifier(), ["q_proj", "v_proj"])


def plain(directory: str):
    Trainer(_lora(), _args(directory), train_dataset=TRAIN, data_collator=default_data_collator).train()


def _bayes(directory: str, model, **options) -> BayesTrainer:
    args = _args(directory, max_grad_norm=options.pop("max_grad_norm", 1.0))
    return BayesTrainer(
        model, args, train_dataset=TRAIN, eval_dataset=EVAL, data_collator=default_data_collator, **options
    )


def vi(directory: str):
    _bayes(directory, bk.VI(_lora(), params="lora", num_data=N_TRAIN, seed=0)).train()


def mc_dropout(directory: str):
    _bayes(directory, bk.MCDropout(_lora(), params="lora", num_data=N_TRAIN, seed=0)).train()


def sgld(directory: str):
    model = _lora()
    optimizer = bk.BayesSGLD(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2, num_data=N_TRAIN, seed=0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    bank = bk.SampleBank(model, params="lora", burnin=STEPS // 2, seed=0)
    _bayes(directory, model, optimizers=(optimizer, schedule), posterior=bank, max_grad_norm=0.0).train()


def laplace(directory: str):
    model = _lora()
    run = _bayes(directory, model)
    run.train()
    run.fit_laplace(bk.DiagLaplace(model, params="lora", seed=0), grid=[1e-2, 1e-1, 1.0, 1e1, 1e2], num_samples=8)


RUNS = {"plain Trainer": plain, "VI": vi, "MC-dropout": mc_dropout, "SGLD + bank": sgld, "Laplace fit": laplace}


@pytest.mark.parametrize("impl", list(RUNS))
def test_trainer_run(benchmark, impl, tmp_path):
    directory = str(tmp_path)
    run = RUNS[impl]
    baseline = impl == "plain Trainer"
    info = {"steps": STEPS, "batch": BATCH}
    if not baseline and cases.INTERLEAVED_ROUNDS > 0:
        rounds = max(cases.INTERLEAVED_ROUNDS // 4, 1)  # a run is ~STEPS training steps
        info["interleaved_ratio"] = cases.interleaved_ratio(
            lambda: plain(directory), lambda: run(directory), torch.device("cpu"), rounds
        )
    record(benchmark, GROUP, impl, baseline=baseline, **info)
    benchmark.pedantic(lambda: run(directory), rounds=cases.ROUNDS, iterations=1, warmup_rounds=1)
