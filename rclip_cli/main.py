"""The ``rclip`` Click group: global options, error handling and the table of subcommands.

Subcommands are imported only when used (so ``rclip vocab`` never pays for importing torch), from the explicit table
``COMMANDS`` below.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import click

from rclip_core.errors import RclipError
from rclip_core.runtime import set_thread_waiting_default

set_thread_waiting_default()  # before any command imports torch

# name -> "module:attribute". One explicit table; no registration magic.
COMMANDS: dict[str, str] = {
    "demo": "rclip_cli.demo:demo",
    "embed": "rclip_cli.embed:embed",
    "eval": "rclip_cli.eval:eval_cmd",
    "pretrain": "rclip_cli.pretrain:pretrain",
    "finetune": "rclip_cli.finetune:finetune",
    "rpn": "rclip_cli.rpn:rpn",
    "visualize": "rclip_cli.visualize:visualize",
    "vocab": "rclip_cli.vocab:vocab",
    "weights": "rclip_cli.weights:weights",
    "zeroshot": "rclip_cli.zeroshot:zeroshot",
}


class RclipGroup(click.Group):
    """A group that loads subcommands lazily and turns user errors into one line and exit code 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RclipError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as e:
            detail = f" ({e})" if str(e) else ""
            click.echo(f"Interrupted{detail}; finished outputs are kept, unfinished ones were not written.", err=True)
            sys.exit(130)

    def main(self, *args, **kwargs):
        """Usage errors (a bad option value, a missing argument) as one ``Error:`` line naming the option, with
        exit code 2, like every other refused input; --help and --version as usual."""
        kwargs.setdefault("standalone_mode", False)
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            click.echo(f"Error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        if isinstance(rv, int) and rv:  # a command that returned an exit code
            sys.exit(rv)
        return rv


@click.group(cls=RclipGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="How much the library logs to stderr.",
)
@click.option(
    "--device",
    default=None,
    help="Torch device for models (cpu, cuda, cuda:1, ...). Default: cuda when available, else cpu.",
)
@click.version_option(package_name="rclip")
@click.pass_context
def cli(ctx: click.Context, log_level: str, device: str | None) -> None:
    """rclip: region-level CLIP (RegionCLIP) for open-vocabulary recognition and detection.

    \b
    First look (random weights unless --weights; every output says so):
      rclip visualize photo.jpg --classes "cup,saucer,spoon"   # pictures in ./rclip-vis
    Typical chain:
      rclip vocab build captions.json --out concepts.txt     # concept pool from captions
      rclip embed --classes concepts.txt --out concepts.pt   # text embeddings
      rclip zeroshot --gt-boxes ann.json --images DIR --classes coco80 --out dets.json
      rclip eval --annotations ann.json --dets dets.json     # COCO / LVIS AP
    Run `rclip demo` for the whole chain on a generated toy world.
    """
    from rclip_cli.common import setup_logging
    from rclip_core.runtime import configure_threads

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads()  # thread pools sized from the cores this process may use, before torch starts them
    # Library warnings (torch's deprecations, open_clip's notices) are for developers, not for a user's terminal.
    warnings.filterwarnings("ignore", module=r"(torch|torchvision|open_clip|timm|huggingface_hub)(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    setup_logging(log_level)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # launched by torchrun: join the job, rank 0 alone logs
        from rclip_core.distributed import init_distributed

        info = init_distributed(device)
        if not info.is_main:
            logging.getLogger().setLevel(logging.ERROR)
            logging.getLogger("rclip_core").setLevel(logging.ERROR)
    ctx.ensure_object(dict)
    ctx.obj["device"] = device
    logging.getLogger("rclip").debug("device option: %s", device)


if __name__ == "__main__":  # pragma: no cover
    cli()
