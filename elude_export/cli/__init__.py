"""The `elude` command line: a thin layer that parses, calls the library and prints.

Every `EludeError` (bad path, unknown model, corrupt plan...) becomes one `error:` line and
exit status 2, never a traceback.
"""

from __future__ import annotations

import click

from elude_export.errors import EludeError


class EludeGroup(click.Group):
    """Click group that reports user errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EludeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=EludeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="elude-export", prog_name="elude")
def main() -> None:
    """ELUDe: split polysemantic MLP neurons into monosemantic sub-units, losslessly.

    \b
    Typical session:
      elude demo                                   # everything on the embedded model, offline
      elude fit vit_base_patch16_224 --pretrained --data images/ -o plan.safetensors
      elude inspect plan.safetensors
    """


def _register() -> None:
    from elude_export.cli import core, evidence, export, fitting
    from serving.cli import serve_command

    for command in (
        fitting.calibrate_command, fitting.fit_command, core.inspect_command, core.demo_command,
        export.export_command, export.validate_command,
        serve_command,
        evidence.evaluate_command, evidence.report_command, evidence.steer_command,
        evidence.label_command,
    ):
        main.add_command(command)


_register()
