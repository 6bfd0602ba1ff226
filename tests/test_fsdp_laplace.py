"""DiagLaplace on a ``fully_shard``-ed model (FSDP2, 2 gloo processes) against one process on the union
of the ranks' data: F (each rank's shard, reduce-scattered), the evidence and the tuned prior precision,
the samples (sharding-independent Philox counters) and the predictive.  One spawned job
(``fsdp_workers.laplace_job``) computes everything."""

from __future__ import annotations

from typing import Any

import fsdp_workers as W
import pytest
import torch

from bayeskern import predict
from bayeskern.posteriors import DiagLaplace

pytestmark = pytest.mark.slow  # spawns a process group

ORDERS = ["after", "before"]  # the posterior created after or before sharding the model


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return W.spawn(W.laplace_job, tmp_path_factory.mktemp("fsdp_laplace"))


@pytest.fixture(scope="module")
def single() -> DiagLaplace:
    return DiagLaplace(W.model(), seed=3, prior_mean=W.laplace_prior()).fit(W.laplace_loader(None), progress=False)


@pytest.mark.parametrize("order", ORDERS)
def test_sharded_fisher_equals_single_process_fisher_on_the_union(job, single, order: str) -> None:
    for rank in range(W.WORLD):
        result = job[rank]
        assert result[f"{order}/layout"], "la.fisher must be laid out like the parameters"
        assert result[f"{order}/grads_untouched"]
        for name, value in single.fisher.items():
            torch.testing.assert_close(result[f"{order}/fisher"][name], value, rtol=1e-5, atol=1e-8, msg=name)
        assert result[f"{order}/num_data"] == single.num_data
        assert result[f"{order}/log_likelihood"] == pytest.approx(single.log_likelihood, rel=1e-6)


@pytest.mark.parametrize("order", ORDERS)
def test_sharded_evidence_prior_precision_and_samples_equal_single_process(job, order: str) -> None:
    single = DiagLaplace(W.model(), seed=3, prior_mean=W.laplace_prior()).fit(W.laplace_loader(None), progress=False)
    evidence = single.log_marginal_likelihood(0.5)
    samples = [single.sample(i) for i in range(3)]
    prior_precision = single.optimize_prior_precision()
    for rank in range(W.WORLD):
        result = job[rank]
        assert result[f"{order}/evidence"] == pytest.approx(evidence, rel=1e-6)
        assert result[f"{order}/prior_precision"] == pytest.approx(prior_precision, rel=1e-5)
        for i, sample in enumerate(samples):
            for name, value in sample.items():
                torch.testing.assert_close(result[f"{order}/samples"][i][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ORDERS)
def test_predict_with_the_sharded_laplace_and_its_state_dict_equals_single_process(job, single, order: str) -> None:
    x, _ = W.data()
    single.optimize_prior_precision()
    expected = predict(single, x[:6], pred_type="nn", num_samples=4).probs
    for rank in range(W.WORLD):
        torch.testing.assert_close(job[rank][f"{order}/predict"], expected, rtol=1e-5, atol=1e-6)
        assert job[rank][f"{order}/weights_restored"]
        sample, probs = job[rank][f"{order}/restored"]  # a sharded state_dict loaded into a new DiagLaplace
        torch.testing.assert_close(probs, job[rank][f"{order}/predict"], rtol=0, atol=0)
        for name, value in single.sample(1).items():
            torch.testing.assert_close(sample[name], value, rtol=1e-5, atol=1e-6)


def test_unsupported_setups_raise_clear_errors(job) -> None:
    for rank in range(W.WORLD):
        found = job[rank]["errors"]
        assert "fit again" in found["fit_then_shard"]
        assert "fallback" in found["fallback"] and "fc.weight" in found["fallback"]
        assert "reduce=False" in found["no_reduce"]
