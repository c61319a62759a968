"""`python -m serving MODEL.onnx [options]`: the same command as `elude serve`."""

from __future__ import annotations

import sys

import click

from serving.cli import serve_command
from elude_export.errors import EludeError


def main() -> int:
    try:
        code = serve_command.main(prog_name="python -m serving", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except EludeError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
