"""``dicom-node-train``: phantoms, datasets, training, evaluation and export.

Each sub-command lives in its own module with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, and
imports a module only when its sub-command is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("training.phantom_cli", "generate phantom PET/MR studies as DICOM"),
    "dataset": ("training.dataset", "build a paired slice dataset from DICOM studies"),
    "phantom-dataset": ("training.phantom_dataset",
                        "a phantom training cohort built straight into a dataset"),
    "train": ("training.train", "train Pix2Pix on a dataset"),
    "evaluate": ("training.evaluate", "evaluate weights on a dataset split (report)"),
    "benchmark": ("training.benchmark",
                  "the node's path on held-out phantom patients, lesion by lesion"),
    "interval-forms": ("training.interval_forms",
                       "choose the TBR interval form by leaving one validation cohort out"),
    "export": ("training.export", "export a checkpoint's generator as node weights"),
    "demo": ("training.demo", "phantom study -> node -> results back, with a TBR table"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicom-node-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args, _ = parser.parse_known_args(argv) if chosen is None else (parser.parse_args(argv), [])
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
