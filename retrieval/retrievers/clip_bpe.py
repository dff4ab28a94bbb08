"""CLIP's byte-pair tokenizer as a transformers ``CLIPTokenizer``, built without the hub.

OWL-ViT's text tower uses CLIP's vocabulary. The hub's tokenizer files are often not
there offline, and ``CLIPTokenizer.from_pretrained`` then *silently* returns a 2-token
tokenizer (every word -> one id). So the tokenizer is built here from ``vocab.json`` +
``merges.txt`` when a checkpoint folder has them, else from open_clip's bundled
``bpe_simple_vocab_16e6.txt.gz`` (the same vocabulary), and its size is checked.

Ids are padded with 0 like open_clip's tokenizer, not with a ``pad_token``: giving "!"
(id 0) the pad role, as the hub's OWL-ViT tokenizer does, makes it a special token and
splits "!!" into two tokens, which CLIP's own tokenizer never does.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from torch import Tensor

from retrieval.errors import RetrievalError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

VOCAB_SIZE = 49408  # 256 bytes x 2 (with/without </w>) + 48,894 merges + 2 specials
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"

Vocab = dict[str, int]
Merges = list[tuple[str, ...]]  # each merge line split on whitespace, as open_clip does


class TokenizerError(RetrievalError, ValueError):
    """The tokenizer files are unusable; the message names them and the fix."""


def bundled_vocab(bpe_path: str | None = None) -> tuple[Vocab, Merges]:
    """Vocabulary and merges exactly as open_clip's ``SimpleTokenizer`` builds them."""
    with gzip.open(bpe_path or default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def folder_vocab(folder: Path) -> tuple[Vocab, Merges] | None:
    """``vocab.json`` + ``merges.txt`` of a checkpoint folder, None when either is absent."""
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    if not (vocab_path.is_file() and merges_path.is_file()):
        return None
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def build_tokenizer(vocab: Vocab, merges: Merges, source: str = "bundled") -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over ``vocab``/``merges``, refusing a vocabulary of the wrong size.

    ``vocab=``/``merges=`` are passed as objects: transformers 5 silently ignores
    ``vocab_file=``/``merges_file=``.
    """
    from transformers import CLIPTokenizer

    if len(vocab) != VOCAB_SIZE or EOS not in vocab or BOS not in vocab:
        raise TokenizerError(
            f"CLIP tokenizer from {source}: {len(vocab)} tokens, expected {VOCAB_SIZE} with "
            f"{BOS} and {EOS}. Remove the broken {VOCAB_FILE}/{MERGES_FILE} to use open_clip's "
            f"bundled vocabulary instead."
        )
    # transformers types merges as list[str]; its tokenizers BPE takes the pairs given here.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
    if len(tokenizer) != VOCAB_SIZE:
        raise TokenizerError(
            f"CLIP tokenizer from {source} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}"
        )
    return tokenizer


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """The checkpoint folder's CLIP tokenizer when it has the files, else the bundled one."""
    found = folder_vocab(Path(folder)) if folder is not None else None
    if found is None:
        return build_tokenizer(*bundled_vocab())
    return build_tokenizer(*found, source=str(folder))


def tokenize(
    tokenizer: CLIPTokenizer, texts: list[str], context_length: int
) -> tuple[Tensor, Tensor]:
    """``[n, context_length]`` ids and attention mask, zero-padded like open_clip.

    A text longer than the context keeps its first ``context_length - 2`` tokens between
    the start and end tokens (open_clip truncates the same way).
    """
    encoded = tokenizer(texts, truncation=True, max_length=context_length)["input_ids"]
    ids = torch.zeros(len(texts), context_length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask
