"""Datasets as in-memory tensors, loaded once."""

from volume_ray.data.digits import load_digits

__all__ = ["load_digits"]
