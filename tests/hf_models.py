"""Tiny Hugging Face models built from configs with random weights (nothing is downloaded), with and
without a peft LoRA wrapper, and batches shaped as ``transformers`` collators make them."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, NUM_LABELS, SEQ = 64, 3, 7
PAD = 0


def llama_config(**overrides):
    from transformers import LlamaConfig

    options = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        num_labels=NUM_LABELS,
    )
    return LlamaConfig(**{**options, **overrides})


def llama_classifier(seed: int = 0) -> nn.Module:
    """``LlamaForSequenceClassification``: rotary, grouped-query attention, RMSNorm."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config()).eval()


def llama_causal_lm(seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM`` (multiple-choice answers scored on their answer tokens)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).eval()


def roberta_classifier(seed: int = 0) -> nn.Module:
    """``RobertaForSequenceClassification``: learned positions, LayerNorm, GELU."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ + 4,
        pad_token_id=1,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return RobertaForSequenceClassification(config).eval()


def vit_classifier(seed: int = 0) -> nn.Module:
    """``ViTForImageClassification`` on 16x16 images in 4x4 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(config).eval()


def with_lora(
    model: nn.Module,
    targets: list[str],
    *,
    r: int = 4,
    dropout: float = 0.1,
    task_type: str | None = "SEQ_CLS",
    seed: int = 0,
) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model`` with LoRA on ``targets``; B is set to small random
    values (peft starts it at zero) so that every adapter weight has a gradient."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    wrapped = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=dropout, task_type=task_type)
    )
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return wrapped


def text_batch(
    size: int = 4, seed: int = 0, pad_token: int = PAD, left_padding: bool = False
) -> dict[str, torch.Tensor]:
    """A collated batch: ``input_ids``, ``attention_mask`` (the examples padded to different lengths) and
    ``labels``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (size, SEQ), generator=g)
    mask = torch.ones(size, SEQ, dtype=torch.long)
    for i in range(size):
        pad = i % 3
        if pad:
            if left_padding:
                mask[i, :pad] = 0
            else:
                mask[i, SEQ - pad :] = 0
    ids = ids.masked_fill(mask == 0, pad_token)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, NUM_LABELS, (size,), generator=g)}


def image_batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(size, 3, 16, 16, generator=g),
        "labels": torch.randint(0, NUM_LABELS, (size,), generator=g),
    }


ANSWER_TOKENS = (5, 6, 7, 8)  # the token ids of the answers "A".."D" of a multiple-choice prompt


def answer_logits(output, inputs) -> torch.Tensor:
    """A causal LM scored on its answer tokens: the logits at each example's last non-padding position
    (right padding), restricted to ``ANSWER_TOKENS`` -- the ``output_fn`` of Laplace-LoRA's evaluation."""
    last = inputs["attention_mask"].sum(1) - 1
    logits = output.logits[torch.arange(len(last), device=last.device), last]
    return logits[:, list(ANSWER_TOKENS)]
