"""Zero-shot evaluation (torch for checkpoints, torch-free for store entries): `evaluate` (scores,
expert-usage plots, writing results into checkpoints and entries) and `sets` (the held-out sets).
"""
