"""Command line: `python -m vitdemo train | teacher | evaluate | predict | explain | export | fit-ood`.

    python -m vitdemo train --data synthetic --preset vit_cifar_4 --epochs 5 --out runs/shapes
    python -m vitdemo train --data ~/.cache/vitdemo/cifar10/train --preset vit_cifar_4 --out runs/cifar
    python -m vitdemo train --data synthetic --time-budget 60 --out runs/minute     # epochs chosen to fit
    python -m vitdemo teacher --data ~/.cache/vitdemo/cifar10/train --out runs/teacher
    python -m vitdemo train --data ~/.cache/vitdemo/cifar10/train --teacher runs/teacher --out runs/taught
    python -m vitdemo evaluate --checkpoint runs/cifar --data ~/.cache/vitdemo/cifar10/train
    python -m vitdemo predict photo.jpg --checkpoint runs/cifar
    python -m vitdemo explain photo.jpg --checkpoint runs/cifar --out views/
    python -m vitdemo export --checkpoint runs/cifar --out model.pt2
    python -m vitdemo export --checkpoint runs/cifar --out model.int8.onnx --int8
    python -m vitdemo fit-ood --checkpoint runs/cifar --data ~/.cache/vitdemo/cifar10/train
    torchrun --nproc_per_node=2 -m vitdemo train ...      # DistributedDataParallel

`python -m vitdemo COMMAND --help` explains every option. Installed (`pip install -e .`), the
`vitdemo` command is the same: `vitdemo train ...`.
"""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..data import DataError
from ..engine import TrainingError
from ..pretrained import PretrainedUnavailable
from ..runtime import RuntimeUnavailable
from . import evaluate, explain, export, fit_ood, predict, support, teacher, train

COMMANDS = (train, teacher, evaluate, predict, explain, export, fit_ood)  # one module each, in --help's order


def build_parser() -> argparse.ArgumentParser:
    # support.Parser: every command's --help shows its defaults (sub-commands inherit its formatter).
    parser = support.Parser(prog=support.program_name(), description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        support.check_device(getattr(args, "device", None))  # before any data are loaded
        if "checkpoint" in vars(args):
            support.check_default_checkpoint(args.checkpoint)
        return args.func(args)
    except (DataError, CheckpointError, TrainingError, RuntimeUnavailable, PretrainedUnavailable, ValueError,
            OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print("interrupted; the last epoch's checkpoint is intact (resume with --resume)", file=sys.stderr)
        else:  # no checkpoint to speak of; what was being written is left as it was
            print("interrupted", file=sys.stderr)
        return 130
