"""The Prometheus metrics the service exports, named in one place.

Ray exports them from every node's metrics port with a `ray_` prefix (counters also
take `_total`, histograms `_bucket`, `_sum` and `_count`). The measuring actors count
what they measure; the driver tells how many measuring tasks are done and pending.
`cluster/grafana/volume_ray.json` is a Grafana dashboard of them, and a test checks that
every metric it plots is one of these.
"""

from __future__ import annotations

from ray.util import metrics

__all__ = ["METRICS", "DriverMetrics", "WorkerMetrics"]

PAIR = ("sweep", "model", "landscape")
# name: (kind, description, tags)
METRICS = {
    "volume_ray_directions_measured": ("counter", "directions measured", PAIR),
    "volume_ray_evaluations": ("counter", "landscape evaluations", PAIR),
    "volume_ray_radii": ("counter", "radii measured (directions x thresholds)", PAIR),
    "volume_ray_censored_radii": ("counter", "radii censored at the search's cap", PAIR),
    "volume_ray_shard_seconds": ("histogram", "seconds per shard", PAIR),
    "volume_ray_latest_radius": ("gauge", "median radius of the latest shard", PAIR),
    "volume_ray_tasks_done": ("gauge", "measuring tasks finished in this run", ("sweep",)),
    "volume_ray_tasks_pending": ("gauge", "measuring tasks queued or running", ("sweep",)),
}
SHARD_SECONDS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 300]


def _metric(name: str):
    kind, description, tags = METRICS[name]
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tags)
    return metrics.Histogram(name, description, boundaries=SHARD_SECONDS, tag_keys=tags)


class WorkerMetrics:
    """What a measuring actor reports after each shard."""

    def __init__(self):
        self.directions = _metric("volume_ray_directions_measured")
        self.evaluations = _metric("volume_ray_evaluations")
        self.radii = _metric("volume_ray_radii")
        self.censored = _metric("volume_ray_censored_radii")
        self.seconds = _metric("volume_ray_shard_seconds")
        self.latest_radius = _metric("volume_ray_latest_radius")

    def shard(self, frame, seconds: float, tags: dict[str, str]) -> None:
        """One shard's rows (`measure_radii`'s frame) and its time."""
        self.directions.inc(frame.direction.nunique(), tags=tags)
        evaluations = int(frame.drop_duplicates("direction").evals.sum())
        if evaluations:  # a base already past every threshold needs none
            self.evaluations.inc(evaluations, tags=tags)
        self.radii.inc(len(frame), tags=tags)
        censored = int(frame.censored.sum())
        if censored:
            self.censored.inc(censored, tags=tags)
        self.seconds.observe(seconds, tags=tags)
        radius = frame.radius.median()
        if radius == radius:  # not NaN
            self.latest_radius.set(float(radius), tags=tags)


class DriverMetrics:
    """What the driver reports as its measuring tasks move."""

    def __init__(self, sweep: str):
        self.tags = {"sweep": sweep}
        self.done = _metric("volume_ray_tasks_done")
        self.pending = _metric("volume_ray_tasks_pending")

    def update(self, done: int, pending: int) -> None:
        self.done.set(done, tags=self.tags)
        self.pending.set(pending, tags=self.tags)
