"""`elude serve MODEL.onnx`: serve an ELUDe export over KServe v2 with feature monitoring.

Options are generated from `serving.config.ServeConfig`, so every flag has its
`ELUDE_SERVE_*` environment variable and the docs, CLI and config cannot drift apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from elude_export.errors import EludeError

CHOICES = {"provider": ("auto", "cpu", "cuda"), "log_level": ("critical", "error", "warning", "info", "debug")}


def _config_options(command):
    from serving.config import option_fields

    for spec in reversed(option_fields()):
        kind = click.Choice(CHOICES[spec.name]) if spec.name in CHOICES else (
            type(spec.default) if spec.default is not None else str)
        default_text = "none" if spec.default is None else str(spec.default)
        command = click.option(
            "--" + spec.name.replace("_", "-"), spec.name, type=kind, default=None, envvar=spec.metadata["env"],
            show_envvar=True, help=f"{spec.metadata['help']} [default: {default_text}]",
        )(command)
    return command


@click.command("serve")
@click.argument("model", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@_config_options
def serve_command(model: Path, **options) -> None:
    """Serve MODEL.onnx (an `elude export` file): KServe v2 REST, /v1 image route, /metrics.

    \b
    Binds 127.0.0.1:8000 by default. Endpoints: /v2/health/{live,ready}, /v2, /v2/models/NAME,
    /v2/models/NAME/infer (JSON + binary tensors), /v1/models/NAME/image, /v1/models/NAME/subunits,
    /v1/monitoring/drift, /metrics, /docs. See docs/serving.md.
    """
    from serving.config import ServeConfig

    if not model.is_file():
        raise EludeError(f"ONNX model not found: {model}")
    try:
        config = ServeConfig(model_path=model, **{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        raise EludeError(str(exc)) from exc
    try:
        from serving.server import serve
    except ImportError as exc:
        raise EludeError(f"serving needs the 'serve' extra ({exc.name} is missing): "
                         "pip install 'elude-export[serve]'") from exc
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.auth_token:
        click.echo(f"warning: binding {config.host} without --auth-token / ELUDE_SERVE_AUTH_TOKEN", err=True)
    serve(config)
