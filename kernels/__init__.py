"""Triton kernels and their launchers (the CUDA path), one module per family.

Installed as `sslkernels.kernels`; importing a family module needs Triton.
"""
