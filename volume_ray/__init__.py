"""volume_ray: measure the volume of loss-landscape minima, from a laptop to a Ray cluster.

Glossary (the terms the code uses, defined once):

- direction: a random Gaussian g in weight space, drawn from (seed, index), and d, its
  filter-normalised form (`directions`).
- walk: the line w* + c*d from the trained weights w* along one direction; c is its
  coefficient.
- landscape: the data a walk is scored on, and the metric there (`landscape`).
- level: a threshold in the landscape's units (a summed loss, or a count of errors).
- crossing: the first coefficient at which a walk's metric passes a level; the radius
  is c*|g|. A walk with no crossing up to its bound is censored.
- search: the state machine that picks where to score a walk next (`search`).
- early exit: stopping a point's scoring once a partial sum decides it (`early_exit`).
- hint: where direction 0 crossed, given to every other walk as its first probe.
- surrogate: a model of a walk's loss between its scored points (`surrogate`).
- parallel walks: walks run at once on the CPU, one per thread (`parallel_walks`).
- ladder: the laws p_k(z) ∝ exp(-k|z|²/2) on a basin, each a rung, from the uniform law
  of directions down to k = 0, combined into a consistent volume (`thermodynamic`).
- pair: one trained model measured on one landscape; a shard is a range of its
  directions, measured by one task and stored as one file.
"""

from volume_ray.estimators import log_volume
from volume_ray.measure import measure_radii

__all__ = ["log_volume", "measure_radii"]
