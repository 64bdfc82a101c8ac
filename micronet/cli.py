"""The ``micronet`` command: argv -> a workflow's options -> the workflow (micronet.workflows), which prints its
progress and report. Errors a user can fix print one line and exit with status 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from micronet.cli_parsers import build_parser

EXIT_USAGE = 2
#: commands that train, and so may run on several GPUs (one DDP process each)
_DISTRIBUTED = {"train", "quantize"}


def _given(command: str, argv: Sequence[str]) -> set[str]:
    """The options ``argv`` gives a value (a resumed run refuses one that differs from what it was started with)."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(list(argv)))) - {"command"}


def _relaunch(args: argparse.Namespace, argv: Sequence[str]) -> int | None:
    """Several ``--gpu_id`` values without torchrun: start one DDP process per GPU running this same command."""
    from micronet.engine.distributed import launched_by_torchrun, parse_gpu_ids

    ids = parse_gpu_ids(args.gpu_id)
    if len(ids) <= 1 or launched_by_torchrun():
        return None
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(ids)}", "-m",
           "micronet.cli", *argv]
    return subprocess.call(cmd)


def run_workflow(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the workflow of ``args.command`` with the options argv gave."""
    from micronet.workflows import VERBS
    from micronet.workflows.options import options_from_namespace

    cls, workflow = VERBS[args.command]
    options = options_from_namespace(cls, args)
    if args.command in _DISTRIBUTED:
        relaunched = _relaunch(args, argv)
        if relaunched is not None:
            return relaunched
        workflow(options, given=_given(args.command, argv))
    else:
        workflow(options)
    return 0


def run_pipeline_command(args: argparse.Namespace) -> int:
    from micronet.pipeline import run_pipeline
    from micronet.pipeline.report import consistency_problems

    def echo(line: str) -> None:
        print(line, flush=True)

    report = run_pipeline(args.config, out=args.out, echo=echo)
    problems = consistency_problems(report)
    print(f"{len(report['rows'])} rows, {report['wall_time_s'] / 60:.1f} min of compute "
          f"({report['this_run_s'] / 60:.1f} min this run); consistency: " + ("all checks pass" if not problems else
                                                                              "; ".join(problems)))
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    from micronet.pipeline.report import consistency_problems, load_report, render_report

    for path in render_report(args.directory):
        print(f"wrote {path}")
    problems = consistency_problems(load_report(args.directory))
    print("consistency: " + ("all checks pass" if not problems else "; ".join(problems)))
    return 0


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.command == "pipeline":
        return run_pipeline_command(args)
    if args.command == "report":
        return run_report_command(args)
    return run_workflow(args, argv)


def main(argv: Sequence[str] | None = None) -> int:
    from micronet.allocator import retain_freed_memory
    from micronet.errors import MicronetError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # training steps stop re-faulting their activations' pages
    try:
        return _dispatch(args, argv)
    except MicronetError as exc:
        print(f"micronet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"micronet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which exited: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep Python from failing on flush at exit
        return 0
    except OSError as exc:  # a path that vanished or became unwritable while the command ran
        where = f" {exc.filename}" if exc.filename else ""
        print(f"micronet {args.command}: error: cannot access{where}: {exc.strerror or exc} "
              "(check the path, its permissions and the free space)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
