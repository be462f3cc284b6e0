"""Fast paths of the round's tensor math: C kernels for CPU, Triton kernels for CUDA.

Each module says when it applies; :mod:`graftopt.functional` picks one and falls back to pure
torch otherwise.
"""
