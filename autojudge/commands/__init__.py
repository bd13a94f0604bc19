"""`autojudge` command line: generate / mine / features / train / eval / bench / annotate."""

from __future__ import annotations

import sys

import click

from autojudge.errors import AutojudgeError


class _Group(click.Group):
    """Turns AutojudgeError (and a few predictable OS errors) into one line on stderr and exit 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AutojudgeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except FileNotFoundError as err:
            click.echo(f"error: file not found: {err.filename or err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="autojudge")
def main():
    """Lossy speculative decoding with AutoJudge / Judge Decoding heads."""


def _register():
    from autojudge.commands.annotate import annotate
    from autojudge.commands.bench import bench
    from autojudge.commands.eval import eval_cmd
    from autojudge.commands.generate import generate
    from autojudge.commands.mine import mine
    from autojudge.commands.train import features, train

    for command in (generate, mine, features, train, eval_cmd, bench, annotate):
        main.add_command(command)


_register()
