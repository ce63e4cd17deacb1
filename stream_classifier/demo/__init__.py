"""``stream-classifier demo``: the whole path, end to end, on one machine.

The demo starts the embedded broker (or uses ``--bootstrap-servers``), trains a model on
the bundled SpamAssassin sample with the offline MiniLM (or loads ``--model``), runs the
real :class:`~stream_classifier.stream.service.StreamService` and the ops HTTP server,
produces the sample's evaluation messages plus a few malformed ones, and shows what comes
out of the output and dead-letter topics as it happens.

Invariants:
- the demo is a client like any other: it produces to the input topic and reads the output
  topics with its own Kafka clients; the service under it is the production one;
- it counts only outputs of its own run (their ids carry a run prefix), so it also works
  against a shared cluster whose topics hold older messages;
- everything it starts (broker, service thread, HTTP server, its own clients) is stopped in
  reverse order on every exit path, Ctrl-C included.

The live view is written to the ``out`` stream given by the CLI; library logging stays on
stderr as JSON.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kafka.errors import KafkaError

from stream_classifier.app import App
from stream_classifier.config import Settings, load_settings
from stream_classifier.demo.clients import OutputWatcher, demo_messages, produce
from stream_classifier.demo.embedded_broker import EmbeddedBroker, create_topics
from stream_classifier.demo.view import Console, LiveView
from stream_classifier.errors import TransportError
from stream_classifier.learn.updates import load_runtime, runtime_options
from stream_classifier.model.examples import Example
from stream_classifier.model.format import ModelBundle
from stream_classifier.model.runtime import ModelRuntime, on_a_passing_thread
from stream_classifier.model.training import TrainingConfig, train_model
from stream_classifier.ops.logs import log_event
from stream_classifier.samples import require_offline_minilm, sample_examples
from stream_classifier.transport.client_config import kafka_python_common_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPreset:
    """CPU-sized training settings for the demo (the model card's defaults take hours on a CPU)."""

    per_class: int
    num_iterations: int
    epochs: int
    batch_size: int
    max_seq_length: int


PRESETS = {
    "default": TrainingPreset(per_class=16, num_iterations=5, epochs=1, batch_size=16, max_seq_length=48),
    "quick": TrainingPreset(per_class=8, num_iterations=2, epochs=1, batch_size=16, max_seq_length=32),
}

# Malformed inputs the demo sends to show dead letters, one per reason: (key, value).
BAD_MESSAGES: tuple[tuple[bytes, bytes | None], ...] = (
    (b"bad-1", b"this is not JSON {"),  # invalid_json
    (b"bad-2", b'{"id": "bad-2", "body": "text under the wrong field"}'),  # missing_text
    (b"bad-3", b'{"id": "bad-3", "text": "   "}'),  # empty_text
    (b"bad-4", b'{"text": "caf\xe9"}'),  # invalid_utf8
    (b"bad-5", None),  # null_value (a tombstone)
)


def balanced_subset(examples: list[Example], per_class: int, seed: int) -> list[Example]:
    """``per_class`` examples of each label, drawn with ``seed``, in a seeded shuffled order."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    chosen = [
        e
        for label in sorted(by_label)
        for e in rng.sample(by_label[label], min(per_class, len(by_label[label])))
    ]
    rng.shuffle(chosen)
    return chosen


@dataclass(frozen=True)
class DemoOptions:
    bootstrap_servers: str | None = None
    messages: int = 400
    model: Path | None = None
    follow: bool = False
    quick: bool = False
    config: Path | None = None
    # Give up waiting for outputs after this long without a new one.
    idle_timeout_s: float = 60.0
    # Fail when no broker of --bootstrap-servers answers within this long.
    connect_timeout_s: float = 15.0


DEMO_SEED = 42
DEMO_PARTITIONS = 3
_SECURITY_SETTINGS = (
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)


def demo_settings(options: DemoOptions, bootstrap_servers: str, *, embedded: bool) -> Settings:
    """The user's settings, with the demo's own group and, for the embedded broker, quick joins."""
    settings = load_settings(options.config)
    settings.kafka.bootstrap_servers = [bootstrap_servers]
    settings.kafka.group_id = f"{settings.kafka.group_id}-demo"
    if embedded:
        # The embedded broker speaks plaintext and completes a group join after about half
        # a session timeout.
        for name in _SECURITY_SETTINGS:
            setattr(settings.kafka, name, None)
        settings.kafka.security_protocol = "PLAINTEXT"
        settings.kafka.session_timeout_ms = 6_000
        settings.kafka.heartbeat_interval_ms = 1_000
    if "port" not in settings.metrics.model_fields_set:
        settings.metrics.host, settings.metrics.port = "127.0.0.1", 0
    return settings


def train_demo_model(preset: TrainingPreset, device: str) -> ModelBundle:
    """A model trained on the bundled sample with the offline MiniLM at ``preset``."""
    examples = balanced_subset(sample_examples("train"), preset.per_class, seed=DEMO_SEED)
    config = TrainingConfig(
        num_iterations=preset.num_iterations,
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        max_seq_length=preset.max_seq_length,
        seed=DEMO_SEED,
    )
    return train_model(examples, str(require_offline_minilm("pass --model DIR")), config, device=device)


def _model(options: DemoOptions, settings: Settings, console: Console) -> ModelRuntime:
    if options.model is not None:
        runtime = load_runtime(settings, options.model)
        console.step("model", f"loaded {options.model}: version {runtime.version}")
        return runtime
    preset = PRESETS["quick" if options.quick else "default"]
    console.step(
        "model",
        f"training all-MiniLM-L6-v2 on {2 * preset.per_class} SpamAssassin examples "
        f"({preset.per_class} per class, {preset.num_iterations} pair iterations, {preset.epochs} epoch) ...",
    )
    started = time.monotonic()
    runtime = on_a_passing_thread(
        lambda: ModelRuntime(train_demo_model(preset, settings.model.device), **runtime_options(settings))
    )
    console.step(
        "", f"trained in {time.monotonic() - started:.1f} s: version {runtime.version} on {runtime.device}"
    )
    return runtime


@contextlib.contextmanager
def _broker(options: DemoOptions, console: Console) -> Iterator[tuple[str, bool]]:
    """Yields (bootstrap servers, embedded?): the given cluster, or an embedded broker."""
    if options.bootstrap_servers:
        console.step("broker", f"{options.bootstrap_servers} (given with --bootstrap-servers)")
        yield options.bootstrap_servers, False
        return
    with EmbeddedBroker() as broker:
        console.step(
            "broker", f"embedded Tansu at {broker.bootstrap_servers} (in memory; stops with the demo)"
        )
        yield broker.bootstrap_servers, True


def _create_topics(settings: Settings, console: Console, connect_timeout_s: float) -> None:
    """Create the demo's topics; on a cluster that refuses, go on with those that exist."""
    k = settings.kafka
    topics = [*k.input_topics, k.output_topic, k.dead_letter_topic]
    try:
        create_topics(
            k.bootstrap_servers[0],
            topics,
            partitions=DEMO_PARTITIONS,
            client_config=kafka_python_common_config(k),
            connect_timeout_s=connect_timeout_s,
        )
    except KafkaError as exc:
        log_event(logger, "demo_create_topics_failed", level=logging.WARNING, error=str(exc))
    console.step(
        "topics", f"{', '.join(k.input_topics)} -> {k.output_topic}; dead letters -> {k.dead_letter_topic}"
    )


@contextlib.contextmanager
def _serving(settings: Settings, runtime: ModelRuntime, console: Console) -> Iterator[App]:
    """The real service and ops HTTP server on their own thread; stopped gracefully on exit."""
    app = App(settings, runtime=runtime, learning=False)
    with app.running():
        app.wait_started(timeout_s=60)
        assert app.ops is not None
        host = "127.0.0.1" if app.ops.host in ("0.0.0.0", "::", "") else app.ops.host
        console.step("metrics", f"http://{host}:{app.ops.port}/metrics   (health: /healthz, /readyz)")
        yield app


def _wait_ready(app: App, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not app.health.snapshot().ready:
        if time.monotonic() > deadline:
            raise TransportError(
                f"the service did not join its consumer group within {timeout_s:.0f} s; "
                "check that the broker is reachable and the topics exist"
            )
        time.sleep(0.1)


def _follow(view: LiveView, watcher: OutputWatcher, settings: Settings, console: Console) -> None:
    """Show every new output until Ctrl-C."""
    k = settings.kafka
    console.line()
    console.step(
        "following",
        f'send JSON like {{"{settings.input.text_field}": "..."}} to topic {k.input_topics[0]} at '
        f"{k.bootstrap_servers[0]}; Ctrl-C stops",
    )
    watcher.accept_all()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            for seen in watcher.poll(0.5):
                view.record(seen)


def run_demo(options: DemoOptions, out: TextIO) -> int:
    """Run the demo, writing the live view to ``out``; 0 when every sample message came out."""
    console = Console(out)
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    eval_examples = sample_examples("eval")
    started = time.monotonic()
    console.line("stream-classifier demo")
    with contextlib.ExitStack() as stack:
        bootstrap, embedded = stack.enter_context(_broker(options, console))
        settings = demo_settings(options, bootstrap, embedded=embedded)
        _create_topics(settings, console, options.connect_timeout_s)
        runtime = _model(options, settings, console)

        inputs = settings.input
        messages, expected = demo_messages(
            eval_examples,
            options.messages,
            run_id,
            input_format=inputs.format,
            text_field=inputs.text_field,
            id_field=inputs.id_field,
        )
        texts = {
            key.decode(): eval_examples[i % len(eval_examples)].text for i, (key, _) in enumerate(messages)
        }
        bad = [(f"{run_id}-{key.decode()}".encode(), value) for key, value in BAD_MESSAGES]
        view = LiveView(console, texts, expected)

        app = stack.enter_context(_serving(settings, runtime, console))
        _wait_ready(app, timeout_s=60)
        watcher = OutputWatcher(settings, run_id)
        stack.callback(watcher.close)
        topic = settings.kafka.input_topics[0]
        console.step("streaming", f"{len(messages)} sample messages + {len(bad)} malformed ones to {topic}")
        console.line()
        view.start_clock()
        produce(settings, topic, [*messages, *bad])
        tally = view.tally
        last_change = time.monotonic()
        while tally.done < len(expected) + len(bad):
            if time.monotonic() - last_change > options.idle_timeout_s:
                console.step("timeout", f"no new output for {options.idle_timeout_s:.0f} s")
                break
            for seen in watcher.poll(0.2):
                view.record(seen)
                last_change = time.monotonic()
            view.progress()
        view.progress(force=True)
        view.summary()
        if options.follow:
            _follow(view, watcher, settings, console)
        console.line()
        console.step("stopping", "service, HTTP server" + (", broker" if embedded else ""))
    console.step("done", f"in {time.monotonic() - started:.0f} s")
    return 0 if tally.predicted == len(expected) else 1
