"""The `loractl` command: one entry point, one subcommand per component.

Each component owns its own flags through a `register(subparsers)` function, so
this module only wires them together and never grows component logic.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from controller import canary_cli
from controller import cli as controller_cli
from loractl import __version__
from loractl.demo import cli as demo_cli
from sidecar import cli as sidecar_cli
from simulator import cli as simulator_cli

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

REGISTRARS: tuple[Registrar, ...] = (
    demo_cli.register,
    controller_cli.register,
    canary_cli.register,
    sidecar_cli.register,
    simulator_cli.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loractl",
        description="LoRA adapter lifecycle for vLLM on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"loractl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)
