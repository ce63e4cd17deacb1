"""stream-classifier: few-shot SetFit text classification over Kafka streams."""

__version__ = "0.1.0"
