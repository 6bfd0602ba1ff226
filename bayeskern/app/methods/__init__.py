"""The methods ``bayeskern-finetune`` compares, by name: each trains from a fresh backbone and
returns predictive probabilities.  One class per method on a shared base; ``METHODS`` is the
registry the CLI reads (a new method: its own module here and one entry in ``METHODS``).

* ``vanilla``    -- the deterministic baseline: Adam on the cross-entropy.
* ``vi``         -- mean-field Gaussian VI (``bayeskern.VI``), Adam on the ELBO.
* ``mc_dropout`` -- parameter-level MC-dropout (``bayeskern.MCDropout``) started from the MAP: its
  variational mean begins at the MAP weights and ``--dropout-epochs`` of Adam at ``--dropout-lr``
  optimise the dropout objective.  Normalisation-layer scales and shifts stay point estimates unless
  ``--dropout-norm``: dropping one switches off (or de-centres) a whole channel for every input.
* ``sgld``       -- ``bayeskern.BayesSGLD`` started from the MAP, ``--sgld-epochs`` of sampling into
  a ``SampleBank`` (burn-in, thinning).
* ``laplace``    -- ``bayeskern.DiagLaplace`` around the MAP, prior precision tuned on the
  validation split (``Laplace.precision_grid``).
* ``kron_laplace`` -- ``bayeskern.KronLaplace`` (K-FAC) around the MAP, tuned as ``laplace`` is; run
  when named, not by ``--method all`` (``Method.in_all``).

The MAP is the vanilla fit: reused when ``vanilla`` ran first in the same invocation, otherwise
trained once (checkpointed under ``map/``) and shared by the methods that need it.  BayesDLL starts
every method from pretrained weights; without them the MAP plays that part for the methods that
refine a fit (MC-dropout, SGLD, Laplace).  Adam's learning rate is decayed to zero by a cosine over
each training run (``--lr-schedule``), so that MAP is a converged fit rather than a point of a
noisy constant-rate trajectory -- otherwise the extra low-rate epochs of the refining methods would
be credited to their being Bayesian.  The defaults of the Bayesian methods were chosen on the
validation split, never on test (``benchmarks/results/finetune-settings.md``).

Every method trains through the run's ``Parallel`` (``bayeskern.app.parallel``), with the same calls
in every mode.  Under ``torchrun`` the trained modules run inside ``DistributedDataParallel`` (VI and
MC-dropout through ``forward(inputs, targets)``, their loss), the SGLD bank keeps samples on rank 0
only and Laplace fits each rank's shard of the training set (the Fisher is all-reduced).  With
``--fsdp`` every method trains sharded with FSDP2 instead (the backbone for the plain fit, SGLD and
Laplace, the posterior for VI and MC-dropout), using the library's sharded support (BayesSGLD and a
SampleBank of shards, ``DiagLaplace.fit`` on the sharded model); once trained, each is gathered into
an unsharded copy that rank 0 evaluates as without ``--fsdp``.
"""

from __future__ import annotations

from .base import Method
from .ivon import IVONMethod
from .kron_laplace import KronLaplaceMethod
from .laplace import Laplace
from .mc_dropout import MCDropoutMethod
from .sgld import SGLD
from .vanilla import Vanilla
from .vi import VariationalInference

METHODS: dict[str, type[Method]] = {
    method.name: method
    for method in (Vanilla, VariationalInference, MCDropoutMethod, SGLD, Laplace, KronLaplaceMethod, IVONMethod)
}
"""The registry ``--method`` reads (``all`` runs those with ``in_all``, in this order)."""

__all__ = ["METHODS", "Method"]
