"""The docs, the Grafana dashboard and the alert rules name only metrics and settings that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serving.config import option_fields
from serving_fixtures import build_fixture_model, running_server, sample_inputs

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "serving.md").read_text()


@pytest.fixture(scope="module")
def exposed_metrics(tmp_path_factory) -> set[str]:
    """Metric family names a server exposes after some traffic (histogram/counter suffixes folded)."""
    fixture = build_fixture_model(tmp_path_factory.mktemp("docs") / "fixture.onnx")
    with running_server(fixture.path) as (url, _app):
        with httpx.Client(base_url=url, timeout=10) as http:
            x = sample_inputs(4, np.random.default_rng(0))
            http.post("/v2/models/fixture/infer", json={"inputs": [
                {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
            http.post("/v2/models/fixture/infer", content=b"{")
            for _ in range(50):  # the monitor observes off the response path
                text = http.get("/metrics").text
                if "elude_drift_psi{" in text:
                    break
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    return names | {n + "_total" for n in names} | {n + s for n in names for s in ("_bucket", "_sum", "_count")}


def test_docs_name_every_setting():
    for spec in option_fields():
        assert spec.metadata["env"] in DOCS, spec.metadata["env"]
        assert "--" + spec.name.replace("_", "-") in DOCS, spec.name


def test_docs_name_every_exposed_metric(exposed_metrics):
    families = {n for n in exposed_metrics  # prometheus-client's `_created` companions are not ours to document
                if "_created" not in n and not n.endswith(("_bucket", "_sum", "_count"))}
    documented = set(re.findall(r"`(elude_[a-z_]+)`", DOCS))
    missing = {n for n in families if n not in documented and n.removesuffix("_total") not in documented
               and n + "_total" not in documented}
    assert not missing


def referenced(expressions: list[str]) -> set[str]:
    return {m for e in expressions for m in re.findall(r"\b(elude_[a-z_]+)", e)}


def test_dashboard_and_alerts_use_existing_metrics(exposed_metrics):
    dashboard = json.loads((ROOT / "serving" / "grafana" / "elude-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((ROOT / "serving" / "prometheus" / "elude-alerts.yml").read_text())
    expressions += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    unknown = referenced(expressions) - exposed_metrics
    assert not unknown
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
