"""Offline bulk classification, torch-free: `classify` (folders, CSV/JSONL indexes and WebDataset
shards to CSV/JSONL/Parquet) and `classify_ray` (the same as a Ray Data pipeline).
"""
