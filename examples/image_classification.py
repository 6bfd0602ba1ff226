"""Image classification with a ViT, each bayeskern method through ``transformers.Trainer``.

    python examples/image_classification.py --tiny                                # offline, a few seconds
    python examples/image_classification.py --model google/vit-base-patch16-224 --method laplace

The data are scikit-learn's handwritten digits (8x8 grey images, 10 classes).  ``--tiny`` trains a small
``ViTForImageClassification`` built from a config (4x4 patches of the 8x8 images) from scratch; otherwise
``--model`` is a hub id or local directory whose image processor resizes the digits, with a new
10-class head.  All weights are trained (``--lora-r`` fine-tunes LoRA adapters on the attention instead),
and ``--params`` picks the Bayesian ones for VI, MC-dropout and Laplace (``last_layer`` by default: the
head).  Prints the table ``bayeskern-finetune`` prints and writes ``metrics.json`` to ``--output-dir``.
"""

from __future__ import annotations

import numpy as np
import torch
from common import (
    METHODS,
    example_parser,
    finish,
    parse_args,
    report,
    run_methods,
    split,
    train_method,
    training_arguments,
)
from sklearn.datasets import load_digits
from transformers import default_data_collator

from bayeskern.integrations.transformers import BayesTrainer


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def main(argv: list[str] | None = None) -> dict:
    parser = example_parser(__doc__, "image_classification", "hub id or local directory of an image classifier")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all")
    parser.add_argument("--params", default="last_layer", help="the Bayesian parameters (bayeskern params=)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank on query/value (0: train all weights)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 100 tiny, 1000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="AdamW's (default: 3e-3 tiny, 5e-5)")
    parser.add_argument("--sgld-lr", type=float, default=None, help="SGLD's step size (default: 0.1 tiny, 1e-3)")
    args = parse_args(parser, argv)
    steps = args.steps or (100 if args.tiny else 1000)
    lr = args.lr or (3e-3 if args.tiny else 5e-5)
    sgld_lr = args.sgld_lr or (0.1 if args.tiny else 1e-3)

    # -- data: the digits, scaled to [0, 1], as pixel_values -----------------------------------------
    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    images, labels = torch.tensor(digits.images[order] / 16.0, dtype=torch.float32), digits.target[order]
    if args.tiny:
        pixels = images[:, None]  # (N, 1, 8, 8)
    else:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(args.model)
        rgb = (images[:, None].expand(-1, 3, -1, -1) * 255).to(torch.uint8)
        pixels = processor(list(rgb), return_tensors="pt")["pixel_values"]
    examples = [{"pixel_values": x, "labels": int(y)} for x, y in zip(pixels, labels)]
    train_set, val_set, test_set = split(examples)
    n = len(train_set)

    def network():
        torch.manual_seed(args.seed)
        if args.tiny:
            model = tiny_vit()
        else:
            from transformers import AutoModelForImageClassification

            model = AutoModelForImageClassification.from_pretrained(
                args.model, num_labels=10, ignore_mismatched_sizes=True
            )
        if args.lora_r:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=args.lora_r, target_modules=["query", "value"], modules_to_save=["classifier"])
            model = get_peft_model(model, lora)
        return model

    def trainer(method: str, model, **options) -> BayesTrainer:
        training_args = training_arguments(
            args.output_dir,
            method,
            steps=steps,
            batch_size=args.batch_size,
            lr=lr,
            seed=args.seed,
            per_device_eval_batch_size=128,
            remove_unused_columns=False,
        )
        return BayesTrainer(
            model,
            training_args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=default_data_collator,
            num_samples=args.num_samples,
            **options,
        )

    def train(method: str) -> BayesTrainer:  # the recipes: common.train_method
        return train_method(
            method, network, trainer, params=args.params, num_data=n, steps=steps, sgld_lr=sgld_lr, seed=args.seed
        )

    methods = METHODS if args.method == "all" else (args.method,)
    results, trainers = run_methods(train, methods, val_set, test_set)
    report(results, args.output_dir, vars(args))
    return {"results": results, "trainers": trainers}


if __name__ == "__main__":
    main()
    finish()
