"""Rectified-flow diffusion: training targets and losses, token masking, and ODE samplers.

Convention: ``t = 0`` is data, ``t = 1`` is noise, ``x_t = (1 - t) x_0 + t noise`` and the
model predicts the velocity ``noise - x_0``.
"""
