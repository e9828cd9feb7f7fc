"""volume_ray: measure the volume of loss-landscape minima, from a laptop to a Ray cluster."""

from volume_ray.measure import measure_radii

__all__ = ["measure_radii"]
