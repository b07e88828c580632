"""flashcon: fused streaming kernels for the supervised-contrastive loss family.

Every loss is computed by streaming over tiles of the N×M similarity matrix with online row
statistics, forward and backward, in O(N·D) memory. See ``flashcon.functional`` for the
losses (``flashcon.modules`` for their ``nn.Module`` forms), ``flashcon.queue`` for the
memory queue, ``flashcon.distributed`` for ``gather_distributed``, ``flashcon.pml`` for the
pytorch-metric-learning stand-in, ``flashcon.reference`` for the dense oracle,
``flashcon.engine`` for the contract every backend implements and ``python -m flashcon.info``
for what this install can run.
"""

import torch  # noqa: F401  (must be imported before the extension is loaded)

from . import reference
from .engine import BackendUnavailableError, resolve_backend
from .functional import (
    esupcon_logits,
    esupcon_loss,
    genscl_loss,
    ntxent_loss,
    sincere_loss,
    supcon_loss,
    tcl_loss,
)
from .modules import ESupConLoss, GenSCLLoss, NTXentLoss, SINCERELoss, SupConLoss, TCLLoss
from .queue import MemoryQueue

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ESupConLoss",
    "GenSCLLoss",
    "MemoryQueue",
    "NTXentLoss",
    "SINCERELoss",
    "SupConLoss",
    "TCLLoss",
    "esupcon_logits",
    "esupcon_loss",
    "genscl_loss",
    "ntxent_loss",
    "reference",
    "resolve_backend",
    "sincere_loss",
    "supcon_loss",
    "tcl_loss",
]
