"""`stream-classifier bench`: throughput and latency, every figure from one run.

Stages (each is skipped with a note when it cannot run, never silently):

- ``bare``: :meth:`ModelRuntime.prepare` + :meth:`~ModelRuntime.infer` on the texts at
  several batch sizes; the best one is the bare runtime's throughput;
- ``precision``: the other precisions (``fp16``/``bf16`` on CUDA, ``int8`` on the CPU) at
  that batch size, against fp32 in interleaved rounds (the median round of each):
  throughput, max |p - p_fp32|, accuracy on the bundled eval sample;
- ``pipeline``: a backlog of messages through the real broker and the real service
  (at-least-once), per transport; the rate counts published predictions from the first
  one on (group join and warm-up excluded); its ratio to bare is against the bare rate at
  the same batch measured right before and after it (the VM drifts between stages);
- ``naive``: consume one message, predict it, produce it, wait for the ack, commit; repeat
  (``model_seconds``: the part spent in ``predict_proba``);
- ``setfit``: ``setfit`` ``predict_proba`` on the same model directory (in a subprocess
  with ``--setfit-python``, or in process when setfit is importable);
- ``latency``: a paced producer at half the pipeline's peak; latency is the output's
  timestamp (set when the service produced it) minus the input's send time.

Texts come from the bundled SpamAssassin sample (subject + first sentences), cut to at most
``--words`` words and numbered so that none repeats; their token-length distribution is
part of the result.
"""

from stream_classifier.bench.broker_stages import produce_backlog
from stream_classifier.bench.driver import format_table, ratios, run_bench, write_results
from stream_classifier.bench.options import BenchOptions, Results
from stream_classifier.bench.stages import bench_texts

__all__ = [
    "BenchOptions",
    "Results",
    "bench_texts",
    "format_table",
    "produce_backlog",
    "ratios",
    "run_bench",
    "write_results",
]
