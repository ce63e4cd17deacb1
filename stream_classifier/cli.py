"""The ``stream-classifier`` command line.

Each command is a small function that turns arguments into calls on the package and
prints its result (JSON where a program reads it). Errors of the package's hierarchy are
printed as one line without a traceback; the exit code is the error's ``exit_code``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stream_classifier.errors import StreamClassifierError

Handler = Callable[[argparse.Namespace], int]


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- commands
# Handlers are filled in by the owners of each area (model, stream, learn, ops, bench).


def _cmd_train(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_eval(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_predict(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_serve(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_demo(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_config(args: argparse.Namespace) -> int:
    from stream_classifier.config import load_settings, masked_dump

    _emit(masked_dump(load_settings(args.config)))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_retrain(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _cmd_bench(args: argparse.Namespace) -> int:
    raise NotImplementedError


# --------------------------------------------------------------------------- parser


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML settings file (env vars override it)")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto|cpu|cuda|cuda:N")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "fp16", "bf16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-classifier",
        description="Classify Kafka text streams with few-shot SetFit models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = add("train", _cmd_train, "Train a SetFit model from a JSONL/CSV file of text and label.")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--base-model", default=None, help="sentence-transformers path or hub id")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--eval-data", type=Path, default=None)
    p.add_argument("--num-iterations", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--skip-bad-rows", action="store_true")
    _add_runtime(p)

    p = add("eval", _cmd_eval, "Evaluate a model directory on a labelled data file.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--trusted", action="store_true", help="allow unrestricted unpickling of the head")
    _add_runtime(p)

    p = add("predict", _cmd_predict, "Classify texts given as arguments, or one per line on stdin.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("texts", nargs="*")
    p.add_argument("--trusted", action="store_true", help="allow unrestricted unpickling of the head")
    _add_runtime(p)

    p = add("serve", _cmd_serve, "Join the consumer group and classify the input topics.")
    _add_config(p)

    p = add("demo", _cmd_demo, "Embedded broker + sample stream: see the service work end to end.")
    _add_config(p)
    p.add_argument("--bootstrap-servers", default=None, help="use this cluster instead of the embedded broker")
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--model", type=Path, default=None, help="serve this model instead of training one")
    p.add_argument("--follow", action="store_true", help="keep running until Ctrl-C")
    p.add_argument("--quick", action="store_true", help="smallest training settings (for tests)")

    p = add("config", _cmd_config, "Print the effective settings (secrets masked).")
    _add_config(p)

    p = add("models", _cmd_models, "List the model store's versions, or promote one (rollback).")
    _add_config(p)
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list versions")
    mp = msub.add_parser("promote", help="make VERSION current and announce it")
    mp.add_argument("version")

    p = add("retrain", _cmd_retrain, "Run one retraining round now (trainer role).")
    _add_config(p)
    p.add_argument("--force", action="store_true", help="ignore min_new_examples")

    p = add("bench", _cmd_bench, "Run the benchmark suite and write JSON results.")
    _add_config(p)
    p.add_argument("--output", type=Path, default=Path("bench-results/bench.json"))
    p.add_argument("--quick", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except StreamClassifierError as exc:
        sys.stderr.write(f"stream-classifier {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
