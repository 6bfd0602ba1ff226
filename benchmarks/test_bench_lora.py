"""Every method over the LoRA adapters of a LLaMA-style classifier, against plain LoRA fine-tuning (issue 17).

The model: ``LlamaForSequenceClassification`` built from a ``LlamaConfig`` with random weights (nothing is
downloaded), wrapped by ``peft.get_peft_model`` with LoRA r = 8 (alpha 16, no LoRA dropout) on
``q_proj, k_proj, v_proj, o_proj``; peft makes the classification head ``score`` trainable as well.
The Bayesian parameters are the adapters (``params="lora"``); the head is a point estimate.
Every group is measured against its baseline in the same run (``deterministic``; every entry records
``peak_bytes``, see ``memory.py``):

* ``train step <model> b<B> t<T>``: one optimizer step of plain LoRA fine-tuning (the baseline:
  cross-entropy through the model, Adam on the trainable parameters); VI (``post.loss(batch)``, Adam
  on ``post.parameters()``, S = 1) with ``prior_mean="pretrained"`` (the default: A at its random
  init, B at zero) and with ``prior_mean="zero"``; MC-dropout (p = 0.1, Adam); SGLD (``BayesSGLD`` on
  the trainable named parameters, then ``SampleBank(params="lora").update()``).  Each method's step
  is also timed alternately with the baseline (``interleaved_ratio``, ``cases.interleaved_ratio``).
  Goals: VI and MC-dropout <= 1.1x, in time and in peak memory.
* ``Fisher epoch <model> b<B> t<T> x<batches>``: ``DiagLaplace(params="lora").fit`` over the batches
  against one plain forward + backward per batch (goal <= 1.5x).
* ``predict <model> b<b> t16 S=10``: ``bayeskern.predict(post, batch, num_samples=10, compile=False)``
  over the adapters of VI and of DiagLaplace against ONE deterministic forward under ``no_grad``
  (the baseline; goal at batch 1: <= 3x); ``deterministic x10`` (ten forwards) for reference; where
  ``predict`` takes ``vectorize``, also both outcomes of its automatic choice forced: the per-sample
  loop (``loop``, ``vectorize=False``) and the vectorised path (``vectorized``, ``vectorize=True``).
* ``prior <tiny model>: ...``: not a speed comparison.  Plain LoRA, and VI with each prior mean,
  fine-tuned for a few dozen steps on a small synthetic task (is a marker token in the sequence?);
  the implementation column carries each one's validation NLL (also ``extra_info["val_nll"]``);
  the time is that of the whole run.  ``python benchmarks/test_bench_lora.py`` prints the same.

Sizes (environment; every variable optional): ``BAYESKERN_BENCH_LORA_PRESET`` ``small`` (default:
4 layers, hidden 512, intermediate 1376, 8 heads, 4 KV heads, vocab 32000, float32, batch 8 x 32
tokens) or ``1b`` (16 layers, hidden 2048, intermediate 5632, 32 heads, 8 KV heads, bf16 weights,
batch 8 x 512 tokens: the device check's); ``BAYESKERN_BENCH_LORA_LAYERS``, ``_HIDDEN``,
``_INTERMEDIATE``, ``_HEADS``, ``_KV_HEADS``, ``_VOCAB``, ``_DTYPE`` (``float32`` / ``bf16``),
``_RANK``, ``_BATCH``, ``_SEQ``, ``_PREDICT_BATCHES`` (default ``1,2,4``), ``_PREDICT_SEQ`` (16),
``_SAMPLES`` (10) override the preset; ``BAYESKERN_BENCH_QUICK=1`` makes everything tiny.  Also
``BAYESKERN_BENCH_DEVICE``, ``_ROUNDS``, ``_INTERLEAVED_ROUNDS``, ``_FISHER_BATCHES`` (cases.py).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import cases
import pytest
import torch
import torch.nn.functional as F
from bench_utils import QUICK, record, synchronize
from memory import Step, peak_bytes
from torch import nn

from bayeskern.posteriors import VI, BayesSGLD, DiagLaplace, MCDropout, SampleBank
from bayeskern.predictive import predict

pytest.importorskip("transformers")
pytest.importorskip("peft")

NUM_DATA = cases.NUM_DATA
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_LABELS = 2
PAD = 0

_PRESETS = {
    #          layers hidden inter heads kv  vocab  dtype      batch seq
    "small": (4, 512, 1376, 8, 4, 32000, "float32", 8, 32),
    "1b": (16, 2048, 5632, 32, 8, 32000, "bf16", 8, 512),
    "quick": (2, 32, 64, 4, 2, 64, "float32", 2, 8),
}
_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoraCase:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str
    batch: int
    seq: int
    rank: int
    predict_batches: tuple[int, ...]
    predict_seq: int
    samples: int

    @property
    def name(self) -> str:
        dtype = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"llama{self.layers}x{self.hidden}-lora{self.rank}{dtype}"


def _case() -> LoraCase:
    preset = os.environ.get("BAYESKERN_BENCH_LORA_PRESET", "quick" if QUICK else "small")
    if preset not in _PRESETS:
        raise ValueError(f"BAYESKERN_BENCH_LORA_PRESET must be one of {', '.join(_PRESETS)}, got {preset!r}")
    fields = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "dtype", "batch", "seq")
    values = {}
    for field, default in zip(fields, _PRESETS[preset]):
        raw = os.environ.get(f"BAYESKERN_BENCH_LORA_{field.upper()}")
        values[field] = default if raw is None else (raw if field == "dtype" else int(raw))
    if values["dtype"] not in _DTYPES:
        raise ValueError(f"BAYESKERN_BENCH_LORA_DTYPE must be one of {', '.join(_DTYPES)}, got {values['dtype']!r}")
    batches = os.environ.get("BAYESKERN_BENCH_LORA_PREDICT_BATCHES", "1,2,4")
    return LoraCase(
        **values,
        rank=int(os.environ.get("BAYESKERN_BENCH_LORA_RANK", 8)),
        predict_batches=tuple(int(b) for b in batches.split(",") if b),
        predict_seq=int(os.environ.get("BAYESKERN_BENCH_LORA_PREDICT_SEQ", 8 if QUICK else 16)),
        samples=int(os.environ.get("BAYESKERN_BENCH_LORA_SAMPLES", 10)),
    )


CASE = _case()
VECTORIZE = "vectorize" in inspect.signature(predict).parameters  # the forced paths are timed where it exists


# -- model and batches -------------------------------------------------------------------------
def llama_lora(
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    *,
    rank: int = 8,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    num_labels: int = NUM_LABELS,
    seed: int = 0,
) -> nn.Module:
    """A ``LlamaForSequenceClassification`` with random weights in ``dtype`` on ``device``, wrapped with
    peft LoRA (r = ``rank``, alpha 2r, no dropout) on the attention projections; peft's own
    initialisation (A random, B zero; its adapters in float32 over a bf16 model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(512, CASE.seq),
        pad_token_id=PAD,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForSequenceClassification(config).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type="SEQ_CLS")
    return get_peft_model(model, lora)


@functools.cache
def model(device_type: str) -> nn.Module:
    """One instance per device for the whole session (a 1B model takes a while to build)."""
    c = CASE
    return llama_lora(
        c.layers,
        c.hidden,
        c.intermediate,
        c.heads,
        c.kv_heads,
        c.vocab,
        rank=c.rank,
        dtype=_DTYPES[c.dtype],
        device=device_type,
    )


def text_batch(size: int, seq: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    """A collated batch (``input_ids``, ``attention_mask``, ``labels``) of random tokens, no padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, CASE.vocab, (size, seq), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, NUM_LABELS, (size,), generator=gen),
    }
    return {key: value.to(device) for key, value in batch.items()}


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


def _trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def _group(kind: str, device: torch.device, batch: int, seq: int, **extra) -> str:
    tags = "".join(f" {k}={v}" for k, v in extra.items())
    return f"{kind} {CASE.name} b{batch} t{seq}{tags} {device.type}"


def _measure(benchmark, device: torch.device, setup: Callable[[], Step], group: str, impl: str, **info) -> Step:
    """Peak memory of the case ``setup`` builds (building it and two calls), then its time; returns the
    (warmed-up) step."""
    net = model(device.type)
    net.zero_grad(set_to_none=True)  # gradients left by an earlier case would lower the peak
    peak, step = peak_bytes(device, setup)

    def call():
        step()
        synchronize(device)

    record(
        benchmark,
        group,
        impl,
        baseline=impl == "deterministic",
        model=CASE.name,
        dtype=CASE.dtype,
        params=sum(p.numel() for p in net.parameters()),
        trainable=sum(p.numel() for _, p in _trainable(net)),
        peak_bytes=peak,
        **info,
    )
    benchmark.pedantic(call, rounds=cases.ROUNDS, iterations=1, warmup_rounds=1)
    return step


def _interleaved(benchmark, device: torch.device, baseline: Callable[[], Step], step: Callable[[], Step]) -> None:
    if cases.INTERLEAVED_ROUNDS > 0:
        model(device.type).zero_grad(set_to_none=True)
        benchmark.extra_info["interleaved_ratio"] = cases.interleaved_ratio(
            baseline(), step(), device, cases.INTERLEAVED_ROUNDS
        )


# -- 1. training steps (and 5. the prior's cost) -----------------------------------------------
TRAIN_IMPLS = ["deterministic", "vi", "vi prior_mean=zero", "mc_dropout", "sgld"]


def train_setup(impl: str, device: torch.device) -> Step:
    net = model(device.type).train()
    batch = text_batch(CASE.batch, CASE.seq, device)
    if impl == "deterministic":
        opt = torch.optim.Adam([p for _, p in _trainable(net)], lr=1e-4)
        inputs, labels = _inputs(batch), batch["labels"]

        def plain():
            loss = F.cross_entropy(net(**inputs).logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return plain
    if impl == "sgld":
        sgld = BayesSGLD(_trainable(net), lr=1e-6, num_data=NUM_DATA, seed=0)
        bank = SampleBank(net, params="lora", device=device)
        inputs, labels = _inputs(batch), batch["labels"]

        def langevin():
            loss = F.cross_entropy(net(**inputs).logits, labels)
            sgld.zero_grad(set_to_none=True)
            loss.backward()
            sgld.step()
            bank.update()

        return langevin
    if impl.startswith("vi"):
        prior_mean = "zero" if impl.endswith("=zero") else "pretrained"
        post = VI(net, params="lora", prior_mean=prior_mean, num_data=NUM_DATA, seed=0)
    else:
        post = MCDropout(net, params="lora", p=0.1, num_data=NUM_DATA, seed=0)
    post.to(device).train()  # the posterior's device is its rng_state buffer's: built on CPU
    opt = torch.optim.Adam(post.parameters(), lr=1e-4)

    def bayesian():
        loss = post.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bayesian


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_train_step(benchmark, bench_device, impl):
    group = _group("train step", bench_device, CASE.batch, CASE.seq)
    _measure(benchmark, bench_device, lambda: train_setup(impl, bench_device), group, impl)
    if impl != "deterministic":
        _interleaved(
            benchmark,
            bench_device,
            lambda: train_setup("deterministic", bench_device),
            lambda: train_setup(impl, bench_device),
        )


# -- 3. the Laplace fit ------------------------------------------------------------------------
def _loader(device: torch.device, count: int) -> list[dict[str, torch.Tensor]]:
    return [text_batch(CASE.batch, CASE.seq, device, seed=10 + k) for k in range(count)]


def fisher_setup(impl: str, device: torch.device) -> Step:
    net = model(device.type).eval()
    loader = _loader(device, cases.FISHER_BATCHES)
    if impl == "deterministic":

        def epoch():
            for batch in loader:
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(**_inputs(batch)).logits, batch["labels"], reduction="sum").backward()

        return epoch
    return lambda: DiagLaplace(net, params="lora", seed=0).fit(loader, progress=False)


@pytest.mark.parametrize("impl", ["deterministic", "laplace"])
def test_fisher_epoch(benchmark, bench_device, impl):
    group = _group("Fisher epoch", bench_device, CASE.batch, CASE.seq, batches=cases.FISHER_BATCHES)
    _measure(
        benchmark, bench_device, lambda: fisher_setup(impl, bench_device), group, impl, batches=cases.FISHER_BATCHES
    )
    if impl != "deterministic":
        _interleaved(
            benchmark,
            bench_device,
            lambda: fisher_setup("deterministic", bench_device),
            lambda: fisher_setup(impl, bench_device),
        )


# -- 4. predict --------------------------------------------------------------------------------
@functools.cache
def _posterior(kind: str, device_type: str):
    """A VI (its initial state: the adapters' means with std 1e-3) or a DiagLaplace fitted on one
    training batch, over the adapters; built once, outside the tracked and timed calls."""
    net = model(device_type).eval()
    if kind == "vi":
        return VI(net, params="lora", num_data=NUM_DATA, seed=0).to(device_type).eval()
    loader = [text_batch(CASE.batch, CASE.seq, torch.device(device_type), seed=20)]
    return DiagLaplace(net, params="lora", seed=0).fit(loader, progress=False)


PREDICT_IMPLS = ["deterministic", "deterministic x10", "vi", "laplace"]
if VECTORIZE:  # the automatic choice's two outcomes, forced
    PREDICT_IMPLS += ["vi loop", "laplace loop", "vi vectorized", "laplace vectorized"]
_FORCED = {"loop": {"vectorize": False}, "vectorized": {"vectorize": True}}


def predict_setup(impl: str, device: torch.device, batch_size: int) -> Step:
    net = model(device.type).eval()
    inputs = _inputs(text_batch(batch_size, CASE.predict_seq, device, seed=30))
    if impl.startswith("deterministic"):
        repeats = CASE.samples if impl.endswith(f"x{CASE.samples}") else 1

        def forwards():
            with torch.no_grad():
                return [net(**inputs).logits for _ in range(repeats)]

        return forwards
    post = _posterior(impl.split()[0], device.type)
    options = _FORCED.get(impl.split()[-1], {})
    return lambda: predict(post, inputs, num_samples=CASE.samples, compile=False, **options)


@pytest.mark.parametrize("impl", [i.replace("x10", f"x{CASE.samples}") for i in PREDICT_IMPLS])
@pytest.mark.parametrize("batch_size", CASE.predict_batches)
def test_predict(benchmark, bench_device, batch_size, impl):
    _posterior("vi", bench_device.type), _posterior("laplace", bench_device.type)  # built before tracking
    group = _group("predict", bench_device, batch_size, CASE.predict_seq, S=CASE.samples)
    _measure(
        benchmark,
        bench_device,
        lambda: predict_setup(impl, bench_device, batch_size),
        group,
        impl,
        samples=CASE.samples,
        vectorize=str(_FORCED.get(impl.split()[-1], {}).get("vectorize", "default")),
    )
    if impl != "deterministic":
        _interleaved(
            benchmark,
            bench_device,
            lambda: predict_setup("deterministic", bench_device, batch_size),
            lambda: predict_setup(impl, bench_device, batch_size),
        )


# -- 5. the adapters' prior: validation NLL after a short fine-tuning ----------------------------
MARK = 5  # the token whose presence is the label
PRIOR_TASK = dict(vocab=64, seq=16, train=512, val=256, steps=48, batch=32, lr=3e-3, seeds=(0, 1, 2))


def marker_task(size: int, seed: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sequences of random tokens; label 1 iff the token ``MARK`` occurs (half of them, at a random
    position): learnable only by attending over the sequence."""
    gen = torch.Generator().manual_seed(seed)
    vocab, seq = PRIOR_TASK["vocab"], PRIOR_TASK["seq"]
    ids = torch.randint(2, vocab, (size, seq), generator=gen)
    ids[ids == MARK] = MARK + 1
    labels = torch.randint(0, 2, (size,), generator=gen)
    where = torch.randint(0, seq, (size,), generator=gen)
    ids[labels == 1, where[labels == 1]] = MARK
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def prior_run(method: str, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fine-tune the adapters (and head) of a tiny LLaMA for ``PRIOR_TASK["steps"]`` Adam steps on
    ``marker_task``: ``method`` is ``"deterministic"`` (plain LoRA) or ``"vi pretrained"`` / ``"vi
    zero"`` (VI with that ``prior_mean``, num_data the training-set size); returns the validation NLL
    and error (VI: ``predict`` with 10 samples)."""
    task = PRIOR_TASK
    net = llama_lora(2, 64, 128, 4, 2, task["vocab"], rank=8, device=device, seed=seed).train()
    train = marker_task(task["train"], 100 + seed, device)
    val = marker_task(task["val"], 200 + seed, device)
    if method == "deterministic":
        trained, params = None, [p for _, p in _trainable(net)]
    else:
        trained = VI(net, params="lora", prior_mean=method.split()[1], num_data=task["train"], seed=seed)
        trained.to(device).train()
        params = list(trained.parameters())
    opt = torch.optim.Adam(params, lr=task["lr"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(task["steps"]):
        index = torch.randint(0, task["train"], (task["batch"],), generator=gen).to(device)
        batch = {key: value[index] for key, value in train.items()}
        if trained is None:
            loss = F.cross_entropy(net(**_inputs(batch)).logits, batch["labels"])
        else:
            loss = trained.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        if trained is None:
            probs = net.eval()(**_inputs(val)).logits.float().softmax(-1)
        else:
            probs = predict(trained, _inputs(val), num_samples=10, compile=False).probs
    labels = val["labels"]
    nll = -probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean()
    return {"val_nll": float(nll), "val_error": float((probs.argmax(-1) != labels).float().mean())}


PRIOR_METHODS = ["deterministic", "vi pretrained", "vi zero"]


def prior_table(seeds=PRIOR_TASK["seeds"]) -> dict[str, dict[str, float]]:
    """Mean validation NLL and error of each of ``PRIOR_METHODS`` over ``seeds``."""
    out = {}
    for method in PRIOR_METHODS:
        runs = [prior_run(method, seed) for seed in seeds]
        out[method] = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
        out[method]["val_nll_per_seed"] = [r["val_nll"] for r in runs]
    return out


@pytest.mark.parametrize("method", PRIOR_METHODS)
def test_prior_validation_nll(benchmark, method):
    """Not a speed comparison: the validation NLL each prior mean reaches (module docstring).  Runs on
    CPU whatever the device (a tiny model)."""
    seeds = PRIOR_TASK["seeds"][:1] if QUICK else PRIOR_TASK["seeds"]
    results: list[dict[str, float]] = []

    def runs():
        results.clear()
        results.extend(prior_run(method, seed) for seed in seeds)

    benchmark.pedantic(runs, rounds=1, iterations=1, warmup_rounds=0)
    nll = sum(r["val_nll"] for r in results) / len(results)
    error = sum(r["val_error"] for r in results) / len(results)
    assert math.isfinite(nll)
    impl = "plain LoRA" if method == "deterministic" else f"VI prior_mean={method.split()[1]}"
    task = PRIOR_TASK
    group = (
        f"prior llama2x64-lora8 cpu: val NLL after {task['steps']} steps (b{task['batch']}, "
        f"N={task['train']}, {len(seeds)} seeds)"
    )
    record(
        benchmark,
        group,
        f"{impl}: val NLL {nll:.3f}, error {error:.3f}",
        baseline=method == "deterministic",
        method=method,
        val_nll=nll,
        val_error=error,
        val_nll_per_seed=[r["val_nll"] for r in results],
        seeds=len(seeds),
    )


if __name__ == "__main__":  # the prior comparison alone: python benchmarks/test_bench_lora.py
    start = time.perf_counter()
    for method, row in prior_table().items():
        per_seed = ", ".join(f"{v:.3f}" for v in row["val_nll_per_seed"])
        print(f"{method:>14}: val NLL {row['val_nll']:.3f} ({per_seed}), error {row['val_error']:.3f}")
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
