"""Sequence classification with LoRA adapters, each bayeskern method through ``transformers.Trainer``.

    python examples/sequence_classification.py --tiny                      # offline, a few seconds
    python examples/sequence_classification.py --model roberta-base --csv reviews.csv --method vi
    torchrun --nproc_per_node=2 examples/sequence_classification.py --tiny  # DDP (gloo on CPU)

``--tiny`` builds a small LLaMA classifier from a config and a word-level tokenizer offline, on a
synthetic task (is the sentence positive, negative or neutral?).  Otherwise ``--model`` is a hub id or
a local directory and ``--csv`` a file with ``text`` and ``label`` columns (integer labels); without it
the synthetic sentences are used.  Prints the table ``bayeskern-finetune`` prints and writes
``metrics.json`` to ``--output-dir``.
"""

from __future__ import annotations

import csv
import random

import torch
from common import (
    METHODS,
    example_parser,
    finish,
    parse_args,
    report,
    run_methods,
    split,
    tiny_llama_config,
    tiny_tokenizer,
    train_method,
    training_arguments,
)
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithPadding, LlamaForSequenceClassification

from bayeskern.integrations.transformers import BayesTrainer

POSITIVE, NEGATIVE = ["good", "great", "fine", "happy"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "film", "book", "was", "is", "very", "quite", "plot", "cast", "and", "it"]


def synthetic_examples(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with positive and negative words: label 0 (more negative), 1 (as many),
    2 (more positive)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        pos, neg = rng.randint(0, 2), rng.randint(0, 2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        words += [rng.choice(POSITIVE) for _ in range(pos)] + [rng.choice(NEGATIVE) for _ in range(neg)]
        rng.shuffle(words)
        examples.append({"text": " ".join(words), "label": 1 + (pos > neg) - (neg > pos)})
    return examples


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [{"text": row["text"], "label": int(row["label"])} for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(
        __doc__, "sequence_classification", "hub id or local directory of a sequence-classification model"
    )
    parser.add_argument("--csv", help="a CSV with text and label columns (default: synthetic sentences)")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 20 tiny, 500)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="AdamW's (default: 1e-2 tiny, 2e-4)")
    parser.add_argument("--sgld-lr", type=float, default=None, help="SGLD's step size (default: 0.1 tiny, 1e-3)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", nargs="+", default=None, help="default: peft's for the architecture")
    args = parse_args(parser, argv)
    steps = args.steps or (20 if args.tiny else 500)
    lr = args.lr or (1e-2 if args.tiny else 2e-4)
    sgld_lr = args.sgld_lr or (0.1 if args.tiny else 1e-3)

    # -- data: train / validation (early choices, Laplace's prior precision) / test ------------------
    examples = read_csv(args.csv) if args.csv else synthetic_examples(240 if args.tiny else 2000, args.seed)
    random.Random(args.seed).shuffle(examples)
    num_labels = max(e["label"] for e in examples) + 1
    if args.tiny:
        tokenizer = tiny_tokenizer(POSITIVE + NEGATIVE + FILLER)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encode = lambda e: {**tokenizer(e["text"], truncation=True, max_length=128), "labels": e["label"]}  # noqa: E731
    train_set, val_set, test_set = ([encode(e) for e in part] for part in split(examples))
    collator = DataCollatorWithPadding(tokenizer)

    def lora_model():
        """A fresh LoRA PeftModel (adapters and the new head trainable; the same on every rank)."""
        torch.manual_seed(args.seed)
        if args.tiny:
            base = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), num_labels=num_labels))
        else:
            from transformers import AutoModelForSequenceClassification

            base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
            base.config.pad_token_id = tokenizer.pad_token_id
        config = LoraConfig(
            task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.lora_targets
        )
        return get_peft_model(base, config)

    def trainer(method: str, model, **options) -> BayesTrainer:
        training_args = training_arguments(
            args.output_dir,
            method,
            steps=steps,
            batch_size=args.batch_size,
            lr=lr,
            seed=args.seed,
            ddp_find_unused_parameters=False,
        )
        return BayesTrainer(
            model,
            training_args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=collator,
            num_samples=args.num_samples,
            **options,
        )

    def train(method: str) -> BayesTrainer:  # the recipes: common.train_method
        return train_method(
            method,
            lora_model,
            trainer,
            params="lora",  # the adapters are Bayesian, the new head a point estimate
            prior_mean="zero",  # peft's A starts random: a zero-mean prior, as in Laplace-LoRA
            num_data=len(train_set),
            steps=steps,
            sgld_lr=sgld_lr,
            seed=args.seed,
        )

    methods = METHODS if args.method == "all" else (args.method,)
    results, trainers = run_methods(train, methods, val_set, test_set)
    report(results, args.output_dir, vars(args))
    return {"results": results, "trainers": trainers}


if __name__ == "__main__":
    main()
    finish()
