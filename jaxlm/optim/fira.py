"""Fira (Chen et al. 2024, arXiv 2410.01623): GaLore plus the scaled out-of-subspace gradient.

The math (Alg. 1, eq. 5-8: channel-wise norm-based scaling φ of the residual G - α·Back(R) and
the norm-growth limiter γ = 1.01) lives next to GaLore's in :func:`jaxlm.optim.galore.
scale_by_galore` (``residual='fira'``), since Fira shares the projector and the in-subspace Adam.
This module registers ``optim.name=fira``: the same routing as ``galore`` (attention/MLP matrices
projected, embeddings/head/norms plain AdamW) with the residual switched on. The paper's
settings: lr 0.01, T = 200, α = 0.25 (60M-350M) or 0.0625 (1B), ranks as GaLore.

State per matrix: GaLore's plus one f32 scalar (``rnorm``, the limiter's ‖S_{k-1}‖).

Example::

    jaxlm-train configs/shakespeare.yaml optim.name=fira optim.rank=32 optim.proj_gap=50
"""

from jaxlm.optim.build import register_optimizer
from jaxlm.optim.galore import build_galore


def build_fira(cfg):
    return build_galore(cfg, residual="fira")


register_optimizer("galore", build_galore)
register_optimizer("fira", build_fira)
