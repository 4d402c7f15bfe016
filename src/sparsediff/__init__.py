"""sparsediff: sparse-to-sparse training of diffusion models.

The engine is usable on its own::

    import sparsediff
    engine = sparsediff.sparsify(model, optimizer, method="rigl", sparsity=0.9, total_steps=10_000)
    ...
    optimizer.step(); engine.step()
"""

from .sparse import Engine, SparseEngine, SparseSpec, count_flops, sparsify

__version__ = "0.1.0"
__all__ = ["Engine", "SparseEngine", "SparseSpec", "__version__", "count_flops", "sparsify"]
