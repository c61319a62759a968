"""The KServe manifests in deploy/kserve/ are valid `serving.kserve.io/v1beta1` InferenceServices.

A hand-written JSON schema of the fields KServe requires (and the types it checks) stands in
for the cluster's CRD validation; `jsonschema_rs` runs it when installed, and structural
asserts check the same essentials either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))

PROBE = {"type": "object", "required": ["httpGet"],
         "properties": {"httpGet": {"type": "object", "required": ["path", "port"],
                                    "properties": {"path": {"type": "string", "pattern": "^/v2/health/"},
                                                   "port": {"type": ["integer", "string"]}}}}}
RESOURCES = {"type": "object", "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
             "required": ["requests", "limits"]}
CONTAINER = {"type": "object", "required": ["name", "image"],
             "properties": {"name": {"type": "string"}, "image": {"type": "string"},
                            "args": {"type": "array", "items": {"type": "string"}},
                            "command": {"type": "array", "items": {"type": "string"}},
                            "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                            "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
                            "resources": RESOURCES, "readinessProbe": PROBE, "livenessProbe": PROBE}}
MODEL = {"type": "object", "required": ["modelFormat", "protocolVersion", "storageUri"],
         "properties": {"modelFormat": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}}},
                        "protocolVersion": {"enum": ["v1", "v2", "grpc-v2"]},
                        "runtime": {"type": "string"}, "storageUri": {"type": "string", "minLength": 1},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "resources": RESOURCES, "readinessProbe": PROBE}}
SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                             "maxLength": 63}}},
        "spec": {"type": "object", "required": ["predictor"], "properties": {"predictor": {
            "type": "object",
            "properties": {"minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1},
                           "model": MODEL,
                           "containers": {"type": "array", "minItems": 1, "maxItems": 1, "items": CONTAINER}},
            "oneOf": [{"required": ["model"]}, {"required": ["containers"]}]}}},
    },
}


def test_both_deployments_exist():
    assert {p.name for p in MANIFESTS} == {"inferenceservice.yaml", "elude-serve.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_a_valid_inference_service(path):
    document = yaml.safe_load(path.read_text())
    try:
        import jsonschema_rs
    except ImportError:
        jsonschema_rs = None
    if jsonschema_rs is not None:
        errors = [str(e) for e in jsonschema_rs.Draft202012Validator(SCHEMA).iter_errors(document)]
        assert not errors, errors
    assert document["apiVersion"] == "serving.kserve.io/v1beta1" and document["kind"] == "InferenceService"
    predictor = document["spec"]["predictor"]
    if "model" in predictor:  # Triton runtime on the exporter's model repository
        model = predictor["model"]
        assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
        assert model["storageUri"] and model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    else:  # `elude serve` as a custom container
        container, = predictor["containers"]
        assert container["command"][:2] == ["elude", "serve"]
        env = {e["name"]: e for e in container["env"]}
        assert "STORAGE_URI" in env and "secretKeyRef" in env["ELUDE_SERVE_AUTH_TOKEN"]["valueFrom"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        port = container["ports"][0]["containerPort"]
        assert f"--port={port}" in container["args"]


def test_custom_container_flags_exist():
    """Every `--flag` the manifest passes is an `elude serve` option."""
    from serving.config import option_fields

    flags = {"--" + spec.name.replace("_", "-") for spec in option_fields()}
    document = yaml.safe_load((ROOT / "deploy" / "kserve" / "elude-serve.yaml").read_text())
    container, = document["spec"]["predictor"]["containers"]
    used = {arg.split("=", 1)[0] for arg in container["args"]}
    assert used <= flags, used - flags
    env = {e["name"] for e in container["env"]} - {"STORAGE_URI"}
    assert env <= {spec.metadata["env"] for spec in option_fields()}
