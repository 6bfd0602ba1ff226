"""``kron_laplace``: ``bayeskern.KronLaplace`` (K-FAC) around the MAP, fitted and tuned as ``laplace`` is;
under ``--fsdp`` every rank fits the whole model on its share of the data (K-FAC fits no sharded model).
Run when named (``--method kron_laplace``), not by ``--method all``."""

from __future__ import annotations

import bayeskern as bk

from .laplace import Laplace


class KronLaplaceMethod(Laplace):
    name = "kron_laplace"
    posterior = bk.KronLaplace
    sharded_fit = False
    # not in ``--method all``: over a whole ResNet-18 its samples rotate 4608 x 4608 factors, minutes on two
    # cores for the default job; name it to run it (over LoRA adapters or a last layer it is cheap)
    in_all = False
