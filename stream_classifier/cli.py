"""The ``stream-classifier`` command line.

Each command is a small function that turns arguments into calls on the package and
prints its result (JSON where a program reads it). Errors of the package's hierarchy are
printed as one line without a traceback; the exit code is the error's ``exit_code``.
"""

from __future__ import annotations

import argparse
import json
import math
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


def _default_base_model() -> str:
    """The offline MiniLM when its package is installed, else the documented production default."""
    from stream_classifier.samples import offline_minilm

    minilm = offline_minilm()
    return str(minilm) if minilm is not None else "sentence-transformers/paraphrase-mpnet-base-v2"


def _read_data(path: Path, skip_bad_rows: bool) -> tuple[list[Any], int]:
    from stream_classifier.model.examples import read_examples

    result = read_examples(path, skip_bad_rows=skip_bad_rows)
    for reason in result.skipped_reasons:
        sys.stderr.write(f"skipped bad row: {reason}\n")
    return result.examples, result.skipped


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from stream_classifier.model.calibration import calibrate_from
    from stream_classifier.model.evaluation import evaluate
    from stream_classifier.model.format import save_model
    from stream_classifier.model.runtime import ModelRuntime
    from stream_classifier.model.training import TrainingConfig, train_model

    targets = _target_precisions(args.target_precision)
    examples, skipped = _read_data(args.data, args.skip_bad_rows)
    eval_examples: list[Any] = []
    eval_skipped = 0
    if args.eval_data is not None:
        eval_examples, eval_skipped = _read_data(args.eval_data, args.skip_bad_rows)
    chosen = {
        "num_iterations": args.num_iterations,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps": args.max_steps,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed,
        "recipe": args.recipe,
    }
    config = TrainingConfig(**{key: value for key, value in chosen.items() if value is not None})
    started = time.perf_counter()
    base = args.base_model or _default_base_model()
    bundle = train_model(examples, base, config, device=args.device or "auto")
    training_seconds = round(time.perf_counter() - started, 3)
    summary: dict[str, Any] = {
        "version": bundle.version,
        "labels": bundle.labels,
        "output": str(args.output),
        "examples": len(examples),
        "skipped_rows": skipped + eval_skipped,
        "training_seconds": training_seconds,
        "base_model": bundle.metadata.base_model,
    }
    device, precision = args.device or "auto", args.precision or "auto"
    # Calibrated on --eval-data when given, else out of fold over the training examples.
    fitted_on = eval_examples or examples
    embeddings = ModelRuntime(bundle, device=device, precision=precision).embed([e.text for e in fitted_on])
    bundle.head, summary["calibration"] = calibrate_from(
        bundle.head,
        embeddings,
        [e.label for e in fitted_on],
        targets,
        fit=None if eval_examples else _head_fit(config),
        seed=config.seed,
    )
    if eval_examples:
        runtime = ModelRuntime(bundle, device=device, precision=precision)
        metrics = evaluate(runtime, eval_examples)
        bundle.metadata = bundle.metadata.model_copy(update={"metrics": {"eval": metrics}})
        summary["eval"] = metrics
    save_model(bundle, args.output, int8=args.int8)
    _emit(summary)
    return 0


def _head_fit(config: Any) -> Callable[[Any, list[str]], Any]:
    """How ``train_model`` fits its head under ``config``, for the out-of-fold calibration."""
    from stream_classifier.model.geometry import blend_centroid
    from stream_classifier.model.training import fit_head

    def fit(embeddings: Any, labels: list[str]) -> Any:
        head = fit_head(embeddings, labels, config.seed)
        return blend_centroid(head, embeddings, labels, config.centroid_weight, config.centroid_temperature)

    return fit


def _target_precisions(pairs: list[str] | None) -> dict[str, float]:
    """``LABEL=PRECISION`` pairs (``--target-precision``) as a dict; ConfigError when malformed."""
    from stream_classifier.errors import ConfigError

    targets: dict[str, float] = {}
    for pair in pairs or []:
        label, sep, value = pair.rpartition("=")
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if not sep or not label or not 0.0 <= target <= 1.0:
            raise ConfigError(f"--target-precision {pair!r}: give LABEL=PRECISION, a precision in [0, 1]")
        targets[label] = target
    return targets


def _load_runtime(args: argparse.Namespace) -> Any:
    from stream_classifier.model.runtime import ModelRuntime

    return ModelRuntime.load(
        args.model, device=args.device or "auto", precision=args.precision or "auto", trusted=args.trusted
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from stream_classifier.model.evaluation import evaluate

    examples, skipped = _read_data(args.data, args.skip_bad_rows)
    runtime = _load_runtime(args)
    _emit({"version": runtime.version, **evaluate(runtime, examples), "skipped_rows": skipped})
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from itertools import islice

    runtime = _load_runtime(args)
    lines = args.texts or (line.rstrip("\r\n") for line in sys.stdin)
    texts = (text for text in lines if text.strip())
    while batch := list(islice(texts, 64)):
        for row in runtime.predict_proba(batch):
            best = int(row.argmax())
            probabilities = {label: round(float(p), 6) for label, p in zip(runtime.labels, row, strict=True)}
            _emit({"label": runtime.labels[best], "probabilities": probabilities})
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from stream_classifier.app import App
    from stream_classifier.config import load_settings
    from stream_classifier.ops.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.logging.level)
    app = App(settings)
    # A SIGTERM/SIGINT at any point, model load included, ends in the graceful shutdown.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: app.stop())
    app.run()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from stream_classifier.demo import DemoOptions, run_demo
    from stream_classifier.errors import ConfigError
    from stream_classifier.ops.logs import configure_logging

    if args.messages < 1:
        raise ConfigError("--messages must be at least 1")
    if args.connect_timeout <= 0:
        raise ConfigError("--connect-timeout must be a positive number of seconds")
    # The live view is on stdout; the service's JSON logs stay on stderr, warnings and up.
    configure_logging("WARNING")

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds the demo: service, HTTP server, broker stop

    signal.signal(signal.SIGTERM, _terminate)
    options = DemoOptions(
        bootstrap_servers=args.bootstrap_servers,
        messages=args.messages,
        model=args.model,
        follow=args.follow,
        quick=args.quick,
        config=args.config,
        connect_timeout_s=args.connect_timeout,
    )
    return run_demo(options, sys.stdout)


def _cmd_config(args: argparse.Namespace) -> int:
    from stream_classifier.config import load_settings, masked_dump

    _emit(masked_dump(load_settings(args.config)))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from stream_classifier.config import load_settings
    from stream_classifier.learn.learning import require_store
    from stream_classifier.learn.updates import announce
    from stream_classifier.transport import make_transport

    settings = load_settings(args.config)
    store = require_store(settings)
    if args.models_command == "list":
        manifest = store.read()
        _emit({"current": manifest.current, "versions": [asdict(e) for e in manifest.versions]})
        return 0
    entry = store.promote(args.version)
    producer = make_transport(settings.kafka).producer()
    try:
        announce(producer, settings.retrain.updates_topic, store, entry)
    finally:
        producer.close(10.0)
    _emit({"current": entry.version, "path": str(store.root / entry.path)})
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from stream_classifier.config import load_settings
    from stream_classifier.learn.learning import retrain_once
    from stream_classifier.ops.logs import configure_logging
    from stream_classifier.ops.metrics import Metrics
    from stream_classifier.transport import make_transport

    settings = load_settings(args.config)
    configure_logging(settings.logging.level)
    record = retrain_once(settings, Metrics(), make_transport(settings.kafka), force=args.force)
    _emit(asdict(record))
    return 1 if record.outcome == "failed" else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from stream_classifier.bench import BenchOptions, format_table, run_bench, write_results
    from stream_classifier.errors import ConfigError
    from stream_classifier.ops.logs import configure_logging

    def listed(text: str | None) -> tuple[str, ...]:
        return tuple(part.strip() for part in (text or "").split(",") if part.strip())

    if args.model is not None and args.random_arch is not None:
        raise ConfigError("give --model or --random-arch, not both")
    configure_logging("WARNING")
    options = BenchOptions(
        output=args.output,
        quick=args.quick,
        device=args.device or "auto",
        precision=args.precision or "auto",
        precisions=listed(args.precisions),
        transports=listed(args.transport) or ("kafka-python", "confluent"),
        model=args.model,
        random_arch=args.random_arch,
        tokenizer=args.tokenizer,
        bootstrap_servers=args.bootstrap_servers,
        messages=args.messages,
        words=args.words,
        batch_sizes=tuple(int(b) for b in listed(args.batch_sizes)),
        setfit_python=args.setfit_python,
        stages=listed(args.stages) or BenchOptions.stages,
        stage_timeout_s=args.stage_timeout,
    )
    results = run_bench(options, sys.stderr)
    write_results(results, args.output)
    sys.stdout.write(format_table(results) + f"\nresults: {args.output}\n")
    return 0


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
    p.add_argument(
        "--recipe",
        choices=["setfit", "fast", "anchors", "centroid", "supcon", "combined"],
        default=None,
        help="training recipe (docs/models.md#training-recipe; default setfit, plain SetFit)",
    )
    p.add_argument(
        "--target-precision",
        action="append",
        metavar="LABEL=P",
        help="fit LABEL's threshold to reach precision P on the calibration data (repeatable)",
    )
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--int8", action="store_true", help="also build int8 mode's body into the directory")
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
    p.add_argument(
        "--bootstrap-servers", default=None, help="use this cluster instead of the embedded broker"
    )
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--model", type=Path, default=None, help="serve this model instead of training one")
    p.add_argument("--follow", action="store_true", help="keep running until Ctrl-C")
    p.add_argument("--quick", action="store_true", help="smallest training settings (for tests)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=15.0,
        help="seconds to wait for --bootstrap-servers to answer (default 15)",
    )

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
    _add_runtime(p)
    p.add_argument("--output", type=Path, default=Path("bench-results/bench.json"))
    p.add_argument("--quick", action="store_true", help="fewer messages, shorter stages")
    p.add_argument("--precisions", default=None, help="compared at the best batch: fp32,fp16,bf16")
    p.add_argument("--transport", default=None, help="pipeline transports, e.g. kafka-python,confluent")
    p.add_argument("--model", type=Path, default=None, help="benchmark this model directory")
    p.add_argument(
        "--random-arch",
        choices=["tiny", "minilm", "mpnet-base"],
        default=None,
        help="random-init body of this size (tiny: next to no compute)",
    )
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer files for --random-arch")
    p.add_argument("--bootstrap-servers", default=None, help="a cluster instead of the embedded broker")
    p.add_argument("--messages", type=int, default=None, help="messages through the pipeline")
    p.add_argument("--words", type=int, default=24, help="cut sample texts to this many words")
    p.add_argument("--batch-sizes", default=None, help="bare-runtime batch sizes to try, e.g. 32,128,512")
    p.add_argument("--setfit-python", default=None, help="a Python with setfit, for the setfit stage")
    p.add_argument("--stages", default=None, help="subset of bare,precision,pipeline,naive,setfit,latency")
    p.add_argument("--stage-timeout", type=float, default=120.0, help="seconds per pipeline/setfit stage")
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
