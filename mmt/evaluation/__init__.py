"""Evaluation: attribute accuracy on shapes (no network needed), CIDEr, FID, linear probes."""
