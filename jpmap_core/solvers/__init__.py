"""Solvers for ``y = A x + noise`` with a VAE prior; all batched with per-image state.

* :func:`csgm` -- Bora et al., JPMAP eq. 1.3
* :func:`jpmap` -- JPMAP Algorithms 2.1, 2.2, 2.3 and (with ``alpha``) 2.4
* :func:`mapz_splitting` -- Algorithm 1.1
"""

from ._common import Restoration, adam_minimize
from .csgm import csgm
from .jpmap import jpmap
from .splitting import mapz_splitting

__all__ = ["Restoration", "adam_minimize", "csgm", "jpmap", "mapz_splitting"]
