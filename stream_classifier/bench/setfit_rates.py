"""Run by the bench's setfit stage in a Python that has setfit: ``python setfit_rates.py MODEL_DIR
TEXTS_JSON DEVICE``; prints ``{batch: msg_per_s}`` as JSON for batches 1, 32 and 64."""

import json
import sys
import time

from setfit import SetFitModel

model = SetFitModel.from_pretrained(sys.argv[1], device=sys.argv[3])
with open(sys.argv[2], encoding="utf-8") as handle:
    texts = json.load(handle)
best = {}
for batch in (1, 32, 64):
    sample = texts[: 2 * batch] if batch > 1 else texts[:16]
    model.predict_proba(sample[:batch], batch_size=batch)
    start = time.perf_counter()
    model.predict_proba(sample, batch_size=batch)
    best[batch] = len(sample) / (time.perf_counter() - start)
