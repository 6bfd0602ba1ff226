"""Issue 17, item 4: per-example squared gradients through transformer blocks with a token axis.

``DiagLaplace.fit`` / ``squared_gradients`` on tiny ``transformers`` models (``hf_models``: random
weights, nothing downloaded), with and without a peft LoRA wrapper, against oracles written here:

* ``padded_oracle`` -- torch.func ``grad`` of each example's loss, the example run as a batch of one
  with its own ``attention_mask`` row (a loop over examples, not ``vmap``: ``transformers``' mask
  construction has data-dependent control flow, ``mask.all()``, which ``vmap`` cannot trace);
* ``unpadded_oracle`` -- the same on each example's UNPADDED sequence (its padding positions cut
  out), the strongest check that padding tokens contribute nothing.

Both run in float64 on a copy of the model in eval mode (LoRA dropout off, as in the driver).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils._pytree import tree_map

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_models import (
    ANSWER_TOKENS,
    PAD,
    SEQ,
    answer_logits,
    image_batch,
    llama_causal_lm,
    llama_classifier,
    llama_config,
    roberta_classifier,
    text_batch,
    vit_classifier,
    with_lora,
)

import bayeskern as bk
from bayeskern.batches import logits_of, split_batch
from bayeskern.curvature import squared_gradients
from bayeskern.posteriors.selection import select_parameters

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and it keeps these tests from slowing down by
    orders of magnitude when other processes load the CPUs (threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LLAMA_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_LORA = ["q_proj", "v_proj"]


def sum_ce(logits, target):
    return F.cross_entropy(logits, target, reduction="sum")


# ---------------------------------------------------------------- oracles


def _double(value):
    return tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value)


def _example(inputs: dict, b: int, batch: int) -> dict:
    """Example b of a Mapping of inputs as a batch of one (tensors without a batch axis as they are)."""
    return {
        k: v[b : b + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
        for k, v in inputs.items()
    }


def _unpadded(example: dict) -> dict:
    """A batch of one cut to its non-padding positions (position_ids, if given, renumbered from 0)."""
    keep = example["attention_mask"][0].bool()
    cut = {
        k: v[:, keep] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == keep.numel() else v
        for k, v in example.items()
    }
    if isinstance(cut.get("position_ids"), torch.Tensor):
        cut["position_ids"] = torch.arange(int(keep.sum()))[None]
    return cut


def _oracle(model, batches, names, output_fn=None, unpad=False):
    """sum over examples of (d loss_n / d theta)^2 by torch.func, one example (a batch of one) at a time."""
    model = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    chosen = {n: params[n] for n in names}
    frozen = {**{n: p for n, p in params.items() if n not in chosen}, **dict(model.named_buffers())}

    def loss(chosen, example, target):
        out = functional_call(model, {**frozen, **chosen}, (), example)
        return sum_ce(logits_of(out, example, output_fn), target)

    gradient = grad(loss)
    fisher = {n: torch.zeros_like(p) for n, p in chosen.items()}
    for batch in batches:
        inputs, targets = split_batch(batch)
        for b in range(len(targets)):
            example = _double(_example(inputs, b, len(targets)))
            if unpad:
                example = _unpadded(example)
            for n, g in gradient(chosen, example, targets[b : b + 1]).items():
                fisher[n] += g.square()
    return {n: f.float() for n, f in fisher.items()}


def padded_oracle(model, batches, names, output_fn=None):
    return _oracle(model, batches, names, output_fn)


def unpadded_oracle(model, batches, names, output_fn=None):
    return _oracle(model, batches, names, output_fn, unpad=True)


def assert_fisher_close(got, expected, rtol=1e-4):
    """Every entry within rtol of the oracle, up to rtol times the largest entry of its tensor; tensors
    whose true gradient vanishes (a key projection's bias: softmax ignores it) hold float rounding only,
    compared on the scale of all of them."""
    assert got.keys() == expected.keys()
    overall = max(f.abs().max() for f in expected.values())
    for name in expected:
        key_bias = name.endswith("bias") and ("key" in name or "k_proj" in name)
        scale = 1e-8 * overall if key_bias else expected[name].abs().max()
        assert scale > 0, f"{name}: zero oracle, the test checks nothing"
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=rtol * scale, msg=name)


def laplace_fisher(model, batches, params, output_fn=None):
    laplace = bk.DiagLaplace(model, params=params, prior_mean="zero", output_fn=output_fn, seed=0)
    return laplace.fit(batches, progress=False).fisher, laplace.names


def padded_batches(*, left: bool = False, positions: bool = False, pad_token: int = PAD) -> list[dict]:
    """Two collated batches (sizes 5 and 3) whose examples are padded to different lengths."""
    batches = [
        text_batch(5, seed=0, pad_token=pad_token, left_padding=left),
        text_batch(3, seed=1, pad_token=pad_token, left_padding=left),
    ]
    if positions:  # what generation passes with left padding: each example's positions start at 0
        for batch in batches:
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return batches


def plan_of(model, batches, names, output_fn=None):
    return squared_gradients(model, batches, sum_ce, names, output_fn=output_fn).plan


# ---------------------------------------------------------------- LLaMA: rotary, GQA, RMSNorm, padding_idx


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
@pytest.mark.parametrize("params", [None, "last_layer"], ids=["full", "last_layer"])
def test_llama_fisher_equals_unpadded_per_example_fisher(params, left):
    model = llama_classifier()
    batches = padded_batches(left=left, positions=left)
    fisher, names = laplace_fisher(model, batches, params)
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names))


@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_lora_llama_fisher_equals_unpadded_per_example_fisher(left):
    model = with_lora(llama_classifier(), LLAMA_LORA)
    batches = padded_batches(left=left, positions=left)
    fisher, names = laplace_fisher(model, batches, "lora")
    assert len(names) == 2 * 7 * 2 and all("lora_" in n for n in names)
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names))


def test_lora_llama_every_weight_including_frozen_base_weights():
    """All parameters of a PeftModel: the frozen base weights are rule parameters like the adapters;
    the classifier's original copy (a ModulesToSaveWrapper's ``original_module``) is seen unused and
    keeps a zero Fisher, without a torch.func pass."""
    model = with_lora(llama_classifier(), ATTENTION_LORA)
    batches = padded_batches()
    names = [n for n, _ in model.named_parameters()]
    result = squared_gradients(model, batches, sum_ce, names)
    assert result.plan.fallback == [] and result.plan.unused == ["base_model.model.score.original_module.weight"]
    assert result.fisher["base_model.model.score.original_module.weight"].abs().max() == 0
    used = [n for n in names if n not in result.plan.unused]
    assert_fisher_close({n: result.fisher[n] for n in used}, unpadded_oracle(model, batches, used))


def test_lora_llama_last_layer_is_the_saved_classifier_head():
    model = with_lora(llama_classifier(), ATTENTION_LORA)
    batches = padded_batches()
    fisher, names = laplace_fisher(model, batches, "last_layer")
    assert names == ["base_model.model.score.modules_to_save.default.weight"]
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names))


def test_llama_plans_rules_for_linear_embedding_and_lora_and_broadcast_for_rms_norm():
    """The fast paths: no parameter of these models needs torch.func."""
    model = llama_classifier()
    plan = plan_of(model, padded_batches(), [n for n, _ in model.named_parameters()])
    assert plan.fallback == [] and plan.unused == [] and plan.viewed == []
    assert set(plan.broadcast) == {n for n, _ in model.named_parameters() if "norm" in n}  # weight * hidden
    assert "model.embed_tokens.weight" in plan.rule and "score.weight" in plan.rule
    lora = with_lora(llama_classifier(), LLAMA_LORA)
    names = select_parameters(lora, "lora")
    plan = plan_of(lora, padded_batches(), names)
    assert sorted(plan.rule) == sorted(names)


def test_padding_idx_row_gets_no_fisher_and_padded_ids_change_nothing():
    """Right padding with arbitrary token ids at the padded positions (not the padding token): the
    attention mask alone keeps them out; the padding token's embedding row stays exactly zero."""
    model = llama_causal_lm()
    batches = padded_batches()
    garbage = [dict(b) for b in batches]
    for b in garbage:
        noise = torch.randint(2, 60, b["input_ids"].shape)
        b["input_ids"] = torch.where(b["attention_mask"].bool(), b["input_ids"], noise)
        b["labels"] = b["labels"] % len(ANSWER_TOKENS)
    for b in batches:
        b["labels"] = b["labels"] % len(ANSWER_TOKENS)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    padded = squared_gradients(model, batches, sum_ce, names, output_fn=answer_logits).fisher
    assert model.model.embed_tokens.padding_idx == PAD and padded["model.embed_tokens.weight"][PAD].abs().max() == 0
    other = squared_gradients(model, garbage, sum_ce, names, output_fn=answer_logits).fisher
    expected = unpadded_oracle(model, batches, names, answer_logits)
    assert_fisher_close(padded, expected)
    assert_fisher_close(other, expected)


# ---------------------------------------------------------------- causal LM scored on answer tokens


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_causal_lm_answer_logits_fisher_equals_unpadded_per_example_fisher(lora):
    model = llama_causal_lm()
    if lora:
        model = with_lora(model, ATTENTION_LORA, task_type="CAUSAL_LM")
    batches = padded_batches()
    for batch in batches:
        batch["labels"] = batch["labels"] % len(ANSWER_TOKENS)
    fisher, names = laplace_fisher(model, batches, "lora" if lora else None, output_fn=answer_logits)
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names, answer_logits))


def test_fallback_takes_mapping_kwargs_with_non_tensors_and_unbatched_tensors():
    """Tied embeddings (one weight in F.embedding and F.linear) go to torch.func, whose per-example
    call gets ``use_cache=False``, ``inputs_embeds=None`` and a ``(1, T)`` position_ids as they are;
    the vmap over transformers' mask construction fails, so the examples are looped over."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    batches = padded_batches()
    for batch in batches:
        batch.update(
            labels=batch["labels"] % len(ANSWER_TOKENS),
            use_cache=False,
            inputs_embeds=None,
            position_ids=torch.arange(SEQ)[None],
        )
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    result = squared_gradients(model, batches, sum_ce, names, output_fn=answer_logits)
    assert result.plan.fallback == ["model.embed_tokens.weight"]
    assert_fisher_close(result.fisher, unpadded_oracle(model, batches, names, answer_logits))


def test_lora_on_embeddings_read_as_transposed_views_is_exact():
    """peft's lora.Embedding uses ``lora_embedding_A.T`` (an attribute read, not an op call): such a
    parameter must be traced as used (never let into the Fisher graph past the trigger)."""
    model = with_lora(llama_classifier(), ["embed_tokens", "q_proj"])
    with torch.no_grad():  # peft starts A at zero for embeddings
        for name, param in model.named_parameters():
            if "lora_embedding_A" in name:
                param.normal_(0, 0.1)
    batches = padded_batches()
    fisher, names = laplace_fisher(model, batches, "lora")
    assert any("lora_embedding_A" in n for n in names)
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names))
    head = ["base_model.model.score.modules_to_save.default.weight"]
    assert_fisher_close(laplace_fisher(model, batches, head)[0], unpadded_oracle(model, batches, head))


# ---------------------------------------------------------------- RoBERTa: learned positions, LayerNorm


@pytest.mark.parametrize("params", [None, "last_layer", "lora"])
def test_roberta_fisher_equals_unpadded_per_example_fisher(params):
    model = roberta_classifier()
    if params == "lora":
        model = with_lora(model, ["query", "value", "dense"])
    batches = padded_batches(pad_token=1)  # RoBERTa's padding token; its positions count from it
    fisher, names = laplace_fisher(model, batches, params)
    assert_fisher_close(fisher, unpadded_oracle(model, batches, names))
    assert squared_gradients(model, batches[:1], sum_ce, names).plan.fallback == []


def test_roberta_left_padding_equals_per_example_padded_fisher():
    """Left padding puts a padding token where RoBERTa's classifier reads (position 0), so the unpadded
    sequence is another input: each example is compared with itself as a padded batch of one."""
    model = with_lora(roberta_classifier(), ["query", "value"])
    batches = padded_batches(left=True, pad_token=1)
    fisher, names = laplace_fisher(model, batches, "lora")
    assert_fisher_close(fisher, padded_oracle(model, batches, names))


# ---------------------------------------------------------------- ViT: (1, ...) cls token and positions


@pytest.mark.parametrize("params", [None, "last_layer", "lora"])
def test_vit_fisher_equals_per_example_fisher(params):
    model = vit_classifier()
    if params == "lora":
        model = with_lora(model, ATTENTION_LORA, task_type=None)
    batches = [image_batch(5, seed=0), image_batch(3, seed=1)]
    fisher, names = laplace_fisher(model, batches, params)
    assert_fisher_close(fisher, padded_oracle(model, batches, names))
    plan = squared_gradients(model, batches[:1], sum_ce, names).plan
    assert plan.fallback == []
    if params is None:
        assert set(plan.broadcast) == {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}


# ---------------------------------------------------------------- cost


def test_fit_costs_a_few_plain_epochs_on_the_llama_classifier():
    model = with_lora(llama_classifier(), LLAMA_LORA).eval()
    batches = [text_batch(8, seed=s) for s in range(4)]
    names = select_parameters(model, "lora")

    def plain_epoch():
        for batch in batches:
            inputs, y = split_batch(batch)
            loss = sum_ce(model(**inputs).logits, y)
            torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n in names])

    def fit():
        bk.DiagLaplace(model, params="lora", prior_mean="zero", seed=0).fit(batches, progress=False)

    plain_epoch(), fit()  # warm-up
    times = {"plain": [], "fit": []}
    for _ in range(3):
        for name, run in (("plain", plain_epoch), ("fit", fit)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}  # the least disturbed by other processes
    assert best["fit"] < 8 * best["plain"] + 0.05, best
