"""The mini-SD tokenizer: a CLIP BPE vocabulary learnt from the caption grammar's words, so each word is one token."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from engine.miniworld import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 40  # tokens, BOS and EOS included; the longest grammar caption with style and a trigger needs 28
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?:;()&+/"


def grammar_words() -> list[str]:
    """Every word the caption grammar can produce (plus style names), in a fixed order."""
    words = ["a", "an", "and", "on", "at", "in", "the", "left", "right", "top", "bottom", "center", "background",
             "style", "nothing", ","]
    words += list(world.SIZES) + list(world.COLOURS) + list(world.ALL_SHAPES) + list(world.BACKGROUNDS)
    words += list(world.STYLES)
    return list(dict.fromkeys(words))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016, Alg. 1) learnt until every word of `words` is a single symbol."""
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for sym in corpus for p in zip(sym, sym[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken alphabetically
        merges.append(best)
        new_corpus = []
        for sym in corpus:
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            new_corpus.append(tuple(out))
        corpus = new_corpus


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) for CLIPTokenizer: special tokens, single characters, then every merge result."""
    merges = learn_merges(grammar_words())
    tokens = [BOS, EOS]
    tokens += [c for c in _CHARS] + [c + "</w>" for c in _CHARS]
    tokens += [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def make_tokenizer(folder: str | Path | None = None):
    """A CLIPTokenizer over our vocabulary; written to `folder` (vocab.json, merges.txt, configs) when given."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    if folder is not None:
        tok.save_pretrained(str(folder))
        # the slow-tokenizer files too, so older transformers versions load the same vocabulary
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab, indent=0))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tok


def check_tokenizer(tok) -> None:
    """Raise ValueError unless every grammar word encodes to exactly its own single id (guards silent vocab loss)."""
    vocab, _ = build_vocab()
    for w in grammar_words():
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if ids != [vocab[w + "</w>"]]:
            want = [vocab[w + "</w>"]]
            raise ValueError(f"tokenizer encodes {w!r} as {ids}, expected {want}: vocabulary not loaded")
