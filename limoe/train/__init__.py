"""Training (torch): `trainer` (the loop, DDP under torchrun) and `dataset` (the weighted mix of
prepared sources and users' data that it reads).
"""
