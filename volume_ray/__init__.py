"""volume_ray: measure the volume of loss-landscape minima, from a laptop to a Ray cluster."""

from volume_ray.estimators import log_volume
from volume_ray.measure import measure_radii

__all__ = ["log_volume", "measure_radii"]
