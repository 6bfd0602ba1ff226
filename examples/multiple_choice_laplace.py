"""Laplace-LoRA: a causal LM answers multiple-choice questions by the logits of its answer tokens; LoRA
fine-tuning through ``transformers.Trainer`` gives the MAP, then a diagonal Laplace over the adapters.

    python examples/multiple_choice_laplace.py --tiny                     # offline, a few seconds
    python examples/multiple_choice_laplace.py --model meta-llama/Llama-3.2-1B --jsonl arc_easy.jsonl

Prompts follow the WinoGrande / ARC / OpenBookQA / BoolQ evaluations: the question, the lettered
choices, then ``Answer:``; the model is scored on the logits of the letters at the last position (left
padding puts every prompt's last token there), so the likelihood is a categorical over the choices, as
in Yang et al., "Bayesian low-rank adaptation for large language models" (2024).  ``--jsonl`` rows are
``{"question": str, "choices": [str, ...], "answer": int}`` (BoolQ: choices ``["no", "yes"]``); without
it, and always with ``--tiny``, a synthetic set is built here (the question names the answer's position).
"""

from __future__ import annotations

import json
import random

import torch
import torch.nn.functional as F
from common import (
    example_parser,
    finish,
    parse_args,
    report,
    run_methods,
    split,
    tiny_llama_config,
    tiny_tokenizer,
    training_arguments,
)
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorWithPadding, LlamaForCausalLM

import bayeskern as bk
from bayeskern.integrations.transformers import BayesTrainer

LETTERS = ["A", "B", "C", "D"]
NUMBERS = [str(i) for i in range(10)]
ORDINALS = ["first", "second", "third", "fourth"]


def prompt(question: str, choices: list[str]) -> str:
    lines = [f"Question: {question}", *(f"{LETTERS[i]}: {c}" for i, c in enumerate(choices)), "Answer:"]
    return " \n ".join(lines)


def synthetic_questions(n: int, seed: int) -> list[dict]:
    """Four numbers as choices; the question names the position of the answer (learnable in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = rng.randrange(4)
        rows.append(
            {"question": f"which is the {ORDINALS[answer]} ?", "choices": rng.sample(NUMBERS, 4), "answer": answer}
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, "multiple_choice_laplace", "hub id or local directory of a causal LM")
    parser.add_argument("--jsonl", help="questions: one JSON object per line (default: synthetic)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 30 tiny, 1000)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-2 tiny, 1e-4")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    args = parse_args(parser, argv)
    steps = args.steps or (30 if args.tiny else 1000)

    if args.jsonl:
        with open(args.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = synthetic_questions(300, args.seed)
    random.Random(args.seed).shuffle(rows)
    if args.tiny:
        words = ["Question:", "which", "is", "the", "?", "Answer:", *ORDINALS, *LETTERS, *NUMBERS]
        tokenizer = tiny_tokenizer([*words, *(f"{c}:" for c in LETTERS)], padding_side="left")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    num_choices = max(len(r["choices"]) for r in rows)
    # the id of each letter as the model would write it after "Answer:" (its last token)
    answer_ids = [tokenizer(f" {c}", add_special_tokens=False).input_ids[-1] for c in LETTERS[:num_choices]]

    def answer_logits(output, inputs=None) -> torch.Tensor:
        """The logits of the answer letters at the last position (the output_fn of every predictive)."""
        return output.logits[:, -1, answer_ids]

    def loss(output, labels, num_items_in_batch=None) -> torch.Tensor:  # Trainer's compute_loss_func
        return F.cross_entropy(answer_logits(output), labels)

    encode = lambda r: {**tokenizer(prompt(r["question"], r["choices"])), "labels": r["answer"]}  # noqa: E731
    train_set, val_set, test_set = ([encode(r) for r in part] for part in split(rows))
    torch.manual_seed(args.seed)
    if args.tiny:
        base = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    else:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.model)
    model = get_peft_model(
        base,
        LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=args.lora_targets),
    )
    training_args = training_arguments(
        args.output_dir,
        "laplace",
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr or (1e-2 if args.tiny else 1e-4),
        seed=args.seed,
        remove_unused_columns=False,
    )
    trainer = BayesTrainer(
        model,
        training_args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_loss_func=loss,  # cross-entropy over the answer letters
        output_fn=answer_logits,  # how evaluate reads the MAP's logits
        num_samples=args.num_samples,
    )

    def train(method: str) -> BayesTrainer:
        if method == "map":  # LoRA fine-tuning (no posterior: predict_probs is the model's softmax)
            trainer.train()
        else:  # Laplace-LoRA: the curvature over the training set, lambda tuned on validation
            la = bk.DiagLaplace(model, params="lora", prior_mean="zero", output_fn=answer_logits, seed=args.seed)
            trainer.fit_laplace(la, num_samples=args.num_samples)
        return trainer

    results, _ = run_methods(train, ["map", "laplace"], val_set, test_set)
    report(results, args.output_dir, vars(args))
    return {"results": results, "trainer": trainer}


if __name__ == "__main__":
    main()
    finish()
