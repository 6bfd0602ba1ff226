"""The fine-tuning application behind ``bayeskern-finetune``: data, models, methods, the CLI."""
