"""Shared fixtures: the real broker (Tansu) and the models (real MiniLM, tiny random BERT)."""

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.kafka_broker", "tests.fixtures.models"]
