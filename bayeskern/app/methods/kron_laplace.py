"""``kron_laplace``: ``bayeskern.KronLaplace`` (K-FAC) around the MAP, fitted and tuned as ``laplace`` is;
under ``--fsdp`` every rank fits the whole model on its share of the data (K-FAC fits no sharded model)."""

from __future__ import annotations

import bayeskern as bk

from .laplace import Laplace


class KronLaplaceMethod(Laplace):
    name = "kron_laplace"
    posterior = bk.KronLaplace
    sharded_fit = False
