"""What the example scripts share: the recipe of each method through ``BayesTrainer``, a tiny LLaMA
config and an offline word-level tokenizer for ``--tiny`` runs, data splits and the results table (the
one ``bayeskern-finetune`` prints).  Copy this file with a script."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
from transformers import TrainingArguments

import bayeskern as bk
from bayeskern.app.report import MethodResult, evaluate, markdown_table
from bayeskern.integrations.transformers import BayesTrainer

METHODS = ("vanilla", "vi", "mc_dropout", "sgld", "laplace")


def train_method(
    method: str,
    network: Callable[[], torch.nn.Module],
    trainer: Callable[..., BayesTrainer],
    *,
    params: str,
    num_data: int,
    steps: int,
    sgld_lr: float,
    seed: int,
    prior_mean: str = "pretrained",
) -> BayesTrainer:
    """Train ``method`` and return its Trainer.  ``network()`` builds a fresh model (the same on every
    rank); ``trainer(method, model, **options)`` wraps it in a ``BayesTrainer`` (``options``: its
    ``optimizers`` and ``posterior``) with gradient clipping off for SGLD; ``params`` selects the
    Bayesian weights."""
    common = dict(params=params, prior_mean=prior_mean, seed=seed)
    if method == "vanilla":  # the deterministic fit: AdamW on the model's loss
        run = trainer(method, network())
    elif method == "vi":  # mean-field Gaussian: the Trainer's AdamW trains mu, rho and the point estimates;
        # a cold posterior whose std for weights the data leaves free is prior_std * sqrt(T) = 0.01
        vi = bk.VI(network(), num_data=num_data, temperature=1e-4, init_std=1e-2, **common)
        run = trainer(method, vi)
    elif method == "mc_dropout":  # parameter-level dropout, p = 0.1
        run = trainer(method, bk.MCDropout(network(), num_data=num_data, p=0.1, **common))
    elif method == "sgld":  # Langevin dynamics on every trainable weight; the bank keeps the second half
        model = network()
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        optimizer = bk.BayesSGLD(named, lr=sgld_lr, num_data=num_data, prior_mean=prior_mean, seed=seed)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # a constant step size
        bank = bk.SampleBank(model, params=params, burnin=steps // 2, thin=max(steps // 32, 1), seed=seed)
        run = trainer(method, model, optimizers=(optimizer, schedule), posterior=bank)
    elif method == "laplace":  # the deterministic fit, then a diagonal Laplace tuned on validation
        run = trainer(method, network())
        run.train()
        run.fit_laplace(bk.DiagLaplace(run.model, **common))
        return run
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    run.train()
    return run


def example_parser(description: str, name: str, model_help: str) -> argparse.ArgumentParser:
    """The arguments every example takes: ``--tiny`` or ``--model``, ``--num-samples``, ``--output-dir``
    (default ``runs/<name>``) and ``--seed``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="offline: a tiny model from a config, built here")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--num-samples", type=int, default=16, help="Monte-Carlo samples of the predictive")
    parser.add_argument("--output-dir", default=f"runs/{name}")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, exiting with a usage error unless exactly one of ``--tiny`` and
    ``--model`` is given."""
    args = parser.parse_args(argv)
    if args.tiny == bool(args.model):
        parser.error("give exactly one of --tiny and --model")
    return args


def training_arguments(
    output_dir: str, method: str, *, steps: int, batch_size: int, lr: float, seed: int, **overrides
) -> TrainingArguments:
    """``steps`` optimizer steps of ``batch_size`` per device, no checkpoints, no reporting; gradient
    clipping off for SGLD (the Langevin step needs the raw gradient)."""
    options = dict(
        output_dir=f"{output_dir}/{method}",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        learning_rate=lr,
        save_strategy="no",
        report_to=[],
        logging_steps=max(steps // 5, 1),
        disable_tqdm=True,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        max_grad_norm=0.0 if method == "sgld" else 1.0,
    )
    return TrainingArguments(**{**options, **overrides})


def tiny_llama_config(vocab_size: int, **overrides):
    """A two-layer LLaMA config (hidden 32) for ``--tiny`` runs: random weights, nothing downloaded."""
    from transformers import LlamaConfig

    options = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaConfig(**{**options, **overrides})


def tiny_tokenizer(words: Sequence[str], *, padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` built with the ``tokenizers`` package
    (nothing downloaded): ``[PAD]`` is id 0, ``[UNK]`` id 1, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", padding_side=padding_side
    )


def split(examples: list, fractions: tuple[float, float] = (0.6, 0.2)) -> tuple[list, list, list]:
    """Train, validation and test parts of ``examples`` (in order: shuffle them first)."""
    n_train, n_val = int(fractions[0] * len(examples)), int(fractions[1] * len(examples))
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]


def run_methods(
    train: Callable[[str], BayesTrainer], methods: Sequence[str], val: object, test: object
) -> tuple[dict[str, MethodResult], dict[str, BayesTrainer]]:
    """Time ``train(method)`` for each method and score its predictive on the validation and test sets
    as the CLI does: raw, and after a temperature fitted on validation."""
    results, trainers = {}, {}
    for method in methods:
        start = time.perf_counter()
        trainer = trainers[method] = train(method)
        seconds = time.perf_counter() - start
        val_probs, val_targets = trainer.predict_probs(val)
        test_probs, test_targets = trainer.predict_probs(test)
        results[method] = evaluate(val_probs, val_targets, test_probs, test_targets, seconds, None)
    return results, trainers


def report(results: dict[str, MethodResult], output_dir: str, config: dict) -> None:
    """Print the markdown table and write ``metrics.json`` (rank 0 only under ``torch.distributed``)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(markdown_table(results), flush=True)
    os.makedirs(output_dir, exist_ok=True)
    payload = {"config": config, "methods": {name: {"test": r.test, "val": r.val} for name, r in results.items()}}
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(payload, f, indent=2)


def finish() -> None:
    """Tear down the process group ``torchrun`` / ``accelerate launch`` made (the Trainer leaves it up)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
