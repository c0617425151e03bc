"""Triton kernels that training hands to the models from outside (distributed/wrap.py)."""
