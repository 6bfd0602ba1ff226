"""Every bayeskern method inside ``transformers.Trainer``, through the Trainer's own hooks.

* VI / MC-dropout: the posterior (an ``nn.Module``) is the Trainer's ``model``.  ``compute_loss``
  returns ``posterior(batch)``, i.e. ``posterior.loss(batch)`` (the mean NLL of the minibatch plus
  the regulariser over N) called through the wrapped module, so DDP averages its gradients.  The
  Trainer's optimizer trains ``posterior.parameters()`` (mu, rho, the point estimates) and its
  checkpoints hold ``posterior.state_dict()`` (safetensors), noise counter ``rng_state`` included:
  ``resume_from_checkpoint`` restores the posterior exactly.
* SGLD: ``Trainer(model, optimizers=(BayesSGLD(...), scheduler))`` with ``posterior=SampleBank(...)``;
  ``SampleBankCallback`` calls ``bank.update()`` after every optimizer step (so burn-in and thinning
  count optimizer steps, after gradient accumulation) and the bank is saved with every checkpoint.
* IVON: ``Trainer(model, optimizers=(IVON(...), scheduler))``: the first micro-batch of an optimizer
  step puts a posterior sample in the parameters (``sampled_params(train=True)``) and a step pre-hook
  takes it out just before ``IVON.step()``, after the Trainer's gradient clipping: one sample per
  optimizer step, whose gradient is that of the whole accumulated batch.  ``evaluate`` predicts with
  ``IVON.posterior(model)`` unless a ``posterior`` is given; the optimizer's state (seed included)
  is saved and restored with the Trainer's own ``optimizer.pt``.
* Laplace: ``BayesTrainer.fit_laplace(DiagLaplace(model, ...))`` after ``train()``: the curvature over
  the Trainer's train set (its collator; each example once, also under DDP), the prior precision chosen
  on the eval set (``method="val_nll"``).

``evaluate`` reports ``accuracy``, ``ece``, ``nll`` and ``brier`` (``bayeskern.metrics``) of the
posterior's predictive (``bayeskern.predict``) under ``metric_key_prefix`` (``eval_`` by default);
without a posterior, of the model itself.  Under ``torch.distributed`` each rank predicts its shard
of the eval set and the probabilities are gathered (``Accelerator.gather_for_metrics``), so every
rank reports the metrics of the whole set.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint
from transformers.utils import is_datasets_available

from .. import metrics
from ..batches import OutputFn, logits_of, move_to, split_batch
from ..distributed import is_distributed, rank, world_size
from ..posteriors import IVON, DiagLaplace, SampleBank
from ..posteriors.weight_posterior import WeightPosterior
from ..predictive import predict
from ..protocol import Posterior
from ..validation import check_count

POSTERIOR_FILE = "bayeskern_posterior.pt"
"""Where ``BayesTrainer`` saves a posterior that is not its model (``SampleBank``, a fitted
``DiagLaplace``): next to the weights, in every checkpoint and in ``save_model``'s folder."""

METRICS = ("accuracy", "ece", "nll", "brier")


class SampleBankCallback(TrainerCallback):
    """Feed ``bank`` the iterate after every optimizer step (``on_step_end``)."""

    def __init__(self, bank: SampleBank) -> None:
        self.bank = bank

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self.bank.update()
        return control


class BayesTrainer(Trainer):
    """A ``transformers.Trainer`` that trains, saves, restores and evaluates a bayeskern posterior.

    ``model``: a ``VI`` / ``MCDropout`` posterior (trained by the Trainer's optimizer on
    ``posterior.loss``), or a plain model trained on its own loss (SGLD through
    ``optimizers=(BayesSGLD(...), scheduler)``, IVON through ``optimizers=(IVON(...), scheduler)``, the
    MAP before Laplace, a deterministic baseline).
    ``posterior``: what ``evaluate`` predicts with; defaults to ``model`` when it is a posterior.  A
    ``SampleBank`` is fed by a ``SampleBankCallback`` added here.  ``num_samples``: Monte-Carlo samples
    of the predictive.  ``output_fn``: how the logits of a plain model's output are read
    (``bayeskern.batches``; posteriors carry their own).  Every other argument is the Trainer's.

    Every loss is taken to be a per-batch mean (``loss_is_scaled_for_ga = False``: the Trainer divides it
    by the gradient-accumulation steps), a ``compute_loss_func`` included.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean: the Trainer divides by the GA steps

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        posterior: Posterior | None = None,
        num_samples: int = 32,
        output_fn: OutputFn | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if posterior is None and isinstance(model, WeightPosterior):
            posterior = cast(Posterior, model)
        if isinstance(model, WeightPosterior) and args is not None:
            model.model.to(args.device)  # the held network's frozen weights are read where the posterior runs
        self.posterior = posterior
        self.num_samples = check_count(num_samples, "num_samples", 1)
        self.output_fn = output_fn
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if isinstance(posterior, SampleBank):
            self.add_callback(SampleBankCallback(posterior))
        self._sample: ExitStack | None = None  # IVON's sampled_params block, open between micro-batches
        self._hooked: IVON | None = None  # the IVON whose step pre-hook closes the block

    # -- training --------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns the *network* takes (the posterior's forward takes a batch)."""
        if self._signature_columns is None and isinstance(self.model, WeightPosterior):
            network: Any = self.model.model
            network = network.get_base_model() if hasattr(network, "get_base_model") else network
            names = list(inspect.signature(network.forward).parameters)
            self._signature_columns = cast(Any, [*names, "label", "label_ids", *self.label_names])
        super()._set_signature_columns_if_needed()

    def _ivon(self) -> IVON | None:
        """The Trainer's optimizer if it is an ``IVON`` (accelerate wraps it), else None."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        return optimizer if isinstance(optimizer, IVON) else None

    def _close_sample(self, *exc_info: Any) -> None:
        """Put the mean back; without an exception, collect the sample's gradient for ``IVON.step``."""
        sample, self._sample = self._sample, None
        if sample is not None:
            sample.__exit__(*(exc_info or (None, None, None)))

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The Trainer's step; with an ``IVON`` optimizer the micro-batch runs at the step's posterior
        sample (drawn at the step's first micro-batch, collected by the pre-hook of ``IVON.step``)."""
        ivon = self._ivon()
        if ivon is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._hooked is not ivon:
            ivon.register_step_pre_hook(lambda *_: self._close_sample())
            self._hooked = ivon
        if self._sample is None:
            self._sample = ExitStack()
            self._sample.enter_context(ivon.sampled_params(train=True))
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._close_sample(*sys.exc_info())
            raise

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """A posterior's ``loss(batch)`` through the (possibly DDP-wrapped) module; a plain model's
        loss as the Trainer computes it."""
        if not isinstance(self.accelerator.unwrap_model(model), WeightPosterior):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = model(inputs)
        return (loss, None) if return_outputs else loss

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> TrainOutput:
        """``Trainer.train``; resuming also restores a posterior saved beside the weights
        (``POSTERIOR_FILE``)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(str(self.args.output_dir))
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint: no checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint:
            self.load_posterior(str(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's save (weights, or a posterior module's ``state_dict``), then a posterior that
        is not a module (``SampleBank``, a fitted ``DiagLaplace``) into ``POSTERIOR_FILE``."""
        super()._save(output_dir, state_dict)
        posterior = self.posterior
        if posterior is None or isinstance(posterior, nn.Module) or not self.args.should_save:
            return
        if isinstance(posterior, DiagLaplace) and posterior.log_likelihood is None:
            return  # not fitted yet: nothing to save
        directory = str(output_dir if output_dir is not None else self.args.output_dir)
        torch.save(posterior.state_dict(), os.path.join(directory, POSTERIOR_FILE))

    def load_posterior(self, directory: str) -> None:
        """Restore ``posterior`` from ``directory/POSTERIOR_FILE`` (a posterior module, VI or MC-dropout,
        comes back with the Trainer's weights instead); nothing to do if the file is absent."""
        path = os.path.join(directory, POSTERIOR_FILE)
        if self.posterior is None or isinstance(self.posterior, nn.Module) or not os.path.exists(path):
            return
        self.posterior.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # -- Laplace ---------------------------------------------------------------------------------
    def _loader(self, dataset: Any, batch_size: int, *, shard: bool) -> DataLoader:
        """``dataset`` in order with the Trainer's collator and column handling, every example once (only
        this rank's ``rank::world_size`` share when ``shard``); not prepared by accelerate, whose
        distributed loaders repeat examples to even out the last batch."""
        collator = self.data_collator
        if is_datasets_available() and isinstance(dataset, importlib.import_module("datasets").Dataset):
            dataset = self._remove_unused_columns(dataset, description="Laplace")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Laplace")
        if shard and is_distributed():
            dataset = Subset(dataset, range(rank(), len(dataset), world_size()))
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collator)

    def fit_laplace(
        self,
        laplace: DiagLaplace,
        *,
        grid: Sequence[float] | None = None,
        num_samples: int = 16,
        eval_dataset: Any = None,
    ) -> DiagLaplace:
        """Fit ``laplace`` (built on the trained network) over the Trainer's train set, choose its prior
        precision by the predictive NLL of the eval set (``optimize_prior_precision(method="val_nll")``,
        ``grid`` its candidates) and make it the posterior ``evaluate`` uses.

        Under ``torch.distributed`` each rank fits its share of the train set (every example once) and
        ``fit`` sums the curvature over the ranks; every rank scores the whole eval set, so all choose
        the same precision."""
        if self.train_dataset is None:
            raise ValueError("fit_laplace needs the Trainer's train_dataset")
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if eval_dataset is None:
            raise ValueError("fit_laplace needs an eval_dataset (the prior precision is tuned on it)")
        laplace.model.eval()  # no dropout in the curvature
        laplace.fit(self._loader(self.train_dataset, self.args.per_device_train_batch_size, shard=True), progress=False)
        val_loader = self._loader(eval_dataset, self.args.per_device_eval_batch_size, shard=False)
        laplace.optimize_prior_precision(method="val_nll", val_loader=val_loader, grid=grid, num_samples=num_samples)
        self.posterior = laplace
        return laplace

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_probs(self, dataset: Any = None) -> tuple[Tensor, Tensor]:
        """Predictive probabilities ``(N, C)`` and labels ``(N,)`` of ``dataset`` (default: the eval set),
        gathered over the ranks: the posterior's Monte-Carlo predictive (an IVON optimizer's posterior
        when none is given), or the model's softmax."""
        loader = self.get_eval_dataloader(dataset)
        network = self.accelerator.unwrap_model(self.model)
        posterior = self.posterior
        ivon = self._ivon()
        if posterior is None and ivon is not None:
            posterior = ivon.posterior(network, output_fn=self.output_fn)
        was_training = network.training
        network.eval()
        probs, targets = [], []
        try:
            for batch in loader:
                inputs, labels = split_batch(batch)
                if posterior is not None:
                    p = predict(posterior, [inputs], num_samples=self.num_samples, compile=False).probs
                else:
                    inputs = move_to(inputs, self.args.device)
                    p = logits_of(network(**inputs), inputs, self.output_fn).float().softmax(-1)
                labels = cast(Tensor, labels).to(self.args.device)
                probs.append(self.accelerator.gather_for_metrics(cast(Tensor, p).to(self.args.device)))
                targets.append(self.accelerator.gather_for_metrics(labels))
        finally:
            network.train(was_training)
        return torch.cat(probs).cpu(), torch.cat(targets).cpu()

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Accuracy, ECE, NLL and Brier score of the predictive on ``eval_dataset`` (default: the eval
        set), logged and returned as ``{prefix}_accuracy``, ...; the Trainer's ``on_evaluate``
        callbacks see them as they see its own metrics."""
        probs, targets = self.predict_probs(eval_dataset)
        report = metrics.calibration_report(probs.double(), targets)
        results = {f"{metric_key_prefix}_{name}": report[name] for name in METRICS}
        self.log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, results)
        return results


__all__ = ["METRICS", "POSTERIOR_FILE", "BayesTrainer", "SampleBankCallback"]
