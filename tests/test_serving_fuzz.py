"""Schema fuzzing of the server's OpenAPI (schemathesis, a bounded number of cases): never a 5xx.

Driven through `operation.as_strategy()` + hypothesis rather than schemathesis' pytest plugin
(its lazy-schema parametrisation does not run under pytest 9).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the optional import)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from serving_fixtures import build_fixture_model, running_server  # noqa: E402

MAX_EXAMPLES = 8  # per operation, mode and model name: ~16 operations x 4 -> a few hundred requests


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    fixture = build_fixture_model(tmp_path_factory.mktemp("fuzz") / "fixture.onnx")
    with running_server(fixture.path, max_body_bytes=1024 * 1024, request_timeout_s=5.0) as (url, _app):
        yield url


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors(live_server, mode):
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[str] = []
    for operation in operations:
        has_model = "{model_name}" in operation.path
        for fixed in ({"model_name": "fixture"}, None) if has_model else (None,):
            strategy = operation.as_strategy(mode, path_parameters=fixed)

            @given(case=strategy)
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(base_url=live_server, checks=[not_a_server_error], timeout=10)

            try:
                run()
            except Unsatisfiable:
                continue  # negative mode: nothing in this operation's schema can be made invalid
            except Exception as exc:  # collect all operations' failures into one report
                failures.append(f"{operation.method.upper()} {operation.path} {fixed or ''}: {exc}")
    assert not failures, "\n\n".join(failures)
