"""jpmap_core: the library behind the JPMAP companion (González, Almansa, Tan, SIAM J. Imaging Sci. 2022).

Data flows ``data -> operators (degrade) -> solvers(model) -> metrics -> plotting``. Tensors are
``(B, C, H, W)`` float32 in [0, 1]; noise levels are given on the 0-255 scale.
"""

__version__ = "0.1.0"
