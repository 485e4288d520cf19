"""What every memrl command shares: ``--config/--set/--seed``, one precedence, one error mapping.

Precedence, lowest first: the config file (``--config``), then ``--set KEY=VALUE`` overrides, then
the command's own flags (``--seed``, ``--timesteps``, ...). Every :class:`~memrl.errors.MemrlError`
ends the command with its one-line message and exit code 2; Ctrl-C ends it with exit code 130 and
a line saying what was kept and how to continue.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from memrl.config import Config, load_config, parse_overrides
from memrl.errors import ConfigError, MemrlError

__all__ = ["add_config_args", "check_device", "config_from_args", "run_main"]

log = logging.getLogger(__name__)


def add_config_args(
    parser: argparse.ArgumentParser,
    seed: bool = True,
    default: str | None = "default",
    config_help: str = "a shipped config name (default, test, bench) or a YAML path",
) -> None:
    """Add ``--config`` (``default``: None lets the command supply its own base config to
    :func:`config_from_args`), ``--set`` and (optionally) ``--seed`` to ``parser``."""
    parser.add_argument("--config", default=default, help=config_help)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. finetune.steps=40 env.mode=sequential",
    )
    if seed:
        parser.add_argument("--seed", type=int, default=None, help="the run's seed (config field seed)")


def config_from_args(args: argparse.Namespace, base: Config | None = None, **flags: Any) -> Config:
    """The config from ``--config`` (or ``base`` when it is not given), then ``--set``, then
    ``flags`` (dotted keys; None = unset); ``--seed`` counts as the flag ``seed``. Refuses a CUDA
    device this machine lacks."""
    overrides = parse_overrides(args.set)
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg = load_config(base if args.config is None and base is not None else args.config, overrides)
    check_device(cfg)
    return cfg


def check_device(cfg: Config) -> None:
    """Refuse ``finetune.device=cuda...`` up front on a machine without that GPU (instead of after
    minutes of work)."""
    device = cfg.finetune.device
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ConfigError(
            f"finetune.device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use finetune.device=cpu (or auto)"
        )


def run_main(body: Callable[[], int], interrupted: str = "stopped; nothing was lost") -> int:
    """Run a command's body: MemrlError -> one line on stderr and exit code 2; Ctrl-C -> one line
    (``interrupted``: what was saved and how to resume) and exit code 130."""
    try:
        return body()
    except MemrlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped (| head): not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (silence the flush at exit)
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted{': ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
