"""The Grafana dashboard plots only metrics the service exports, each in the form Ray
gives it (counters `_total`, histograms `_bucket`), and covers what a sweep's progress
needs. That they reach a node's metrics endpoint is tested in test_cluster (the
actors' metrics) and test_service (the driver's)."""

import json
import re
from pathlib import Path

from volume_ray.telemetry import METRICS

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "volume_ray.json"
SUFFIX = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_expression_names_an_exported_metric_in_its_exported_form():
    named = set()
    for expression in expressions():
        found = re.findall(r"\bray_(volume_ray_\w+)", expression)
        assert found, expression
        for name in found:
            base = next((m for m in METRICS if name.startswith(m)), None)
            assert base is not None, f"{name} is not a metric of volume_ray.telemetry"
            kind = METRICS[base][0]
            assert name.removeprefix(base) in SUFFIX[kind], f"{name}: a {kind} is not named so"
            named.add(base)
    assert named == set(METRICS)  # and every exported metric has a panel


def test_the_panels_cover_a_sweeps_progress():
    titles = [panel["title"].lower() for panel in json.loads(DASHBOARD.read_text())["panels"]]
    for topic in ("directions measured per second", "done and pending",
                  "evaluations per direction", "censored fraction", "median radius"):  # fmt: skip
        assert any(topic in title for title in titles), topic
    assert all('sweep=~"$sweep"' in expression for expression in expressions())
