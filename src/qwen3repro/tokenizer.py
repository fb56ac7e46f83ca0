"""Byte-level BPE with Qwen3's special tokens.

One interface, `Tokenizer`, for both scales:

* tiny scale: `train_tokenizer(texts, vocab_size)` learns a byte-level BPE on our own corpus with
  the same normalizer (NFC), pre-tokenizer (Qwen2's split regex, then byte-level) and decoder as
  Qwen2/Qwen3, then appends Qwen3's 26 special tokens, so their ids come last as in Qwen3
  (151643-151668 in the released tokenizer);
* full scale: `Tokenizer.load("Qwen/Qwen3-8B")` wraps the released tokenizer through transformers.

`Tokenizer.save(dir)` writes `tokenizer.json` + `tokenizer_config.json` (chat template inside) that
`transformers.AutoTokenizer.from_pretrained(dir)` loads offline.

Added-token flags follow the released Qwen3 tokenizer: `<|endoftext|>` ... `<|video_pad|>` are
special (dropped by `decode(..., skip_special_tokens=True)`), while `<tool_call>` ... `</think>`
are added tokens that are *not* special, so reasoning and tool-call markup survive that decode.
In both cases a special token's string in the input text encodes to its single id.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from .chat_template import CHAT_TEMPLATE, render
from .files import RunFileError, read_json_object

# The 26 Qwen3 special tokens in id order (ids 151643-151668 in the released tokenizer).
QWEN3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Marked `"special": true` in the released Qwen3 tokenizer (the first 14); the other 12 are plain
# added tokens (`"special": false`).
QWEN3_SKIPPABLE_TOKENS: frozenset[str] = frozenset(QWEN3_SPECIAL_TOKENS[:14])

# Qwen2's (and Qwen3's) pre-tokenizer split: contractions, letters with one leading non-letter,
# single digits, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Released Qwen3 (April 2025) tokenizer_config.json value.
DEFAULT_MODEL_MAX_LENGTH = 131072

N_BYTE_TOKENS = 256

# The files of a byte-level BPE tokenizer saved by transformers in its older, per-file format.
TRANSFORMERS_VOCABULARY = ("vocab.json", "merges.txt")

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in QWEN3_SPECIAL_TOKENS))


def _empty_backend() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder."""
    tok = tokenizers.Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Yield the pieces of each text between special-token strings.

    At encode time the special tokens are cut out of the text before the BPE model sees it, so the
    trainer must not learn merges across (or inside) them either.
    """
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: texts must be strings, got {type(text).__name__}")
        for piece in _SPECIAL_SPLIT.split(text):
            if piece:
                yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> "Tokenizer":
    """Train a byte-level BPE whose total size (learned tokens + 26 special tokens) is `vocab_size`.

    The 256 byte tokens are always present, so `vocab_size` must be at least 256 + 26 = 282. The
    learned tokens take ids 0 .. vocab_size-27 and the special tokens the last 26 ids, in Qwen3's
    order. Training is deterministic for the same input. If the corpus is too small to learn the
    requested number of merges (at `min_frequency`), a ValueError says how many it could learn.
    """
    n_special = len(QWEN3_SPECIAL_TOKENS)
    n_learned = int(vocab_size) - n_special
    if n_learned < N_BYTE_TOKENS:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the {N_BYTE_TOKENS} byte tokens "
            f"and the {n_special} special tokens (at least {N_BYTE_TOKENS + n_special})"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    backend = _empty_backend()
    trainer = BpeTrainer(
        vocab_size=n_learned,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    learned = backend.get_vocab_size(with_added_tokens=False)
    if learned != n_learned:
        raise ValueError(
            f"the corpus only supports {learned} learned tokens (merges seen at least "
            f"{min_frequency} times), fewer than the {n_learned} needed for vocab_size={vocab_size}; "
            "give more text, lower min_frequency or ask for a smaller vocab_size"
        )
    for token in QWEN3_SPECIAL_TOKENS:
        added = AddedToken(
            token, single_word=False, lstrip=False, rstrip=False, normalized=False,
            special=token in QWEN3_SKIPPABLE_TOKENS,
        )
        if token in QWEN3_SKIPPABLE_TOKENS:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
    return Tokenizer(backend)


class Tokenizer:
    """A thin interface over a `tokenizers.Tokenizer` holding Qwen3's special tokens.

    Both our trained tokenizers and the released Qwen3 tokenizer fit it; every special token of
    `QWEN3_SPECIAL_TOKENS` must be present as a single id.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        self.backend = backend
        self.model_max_length = int(model_max_length)
        missing = [t for t in QWEN3_SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks Qwen3 special tokens: {', '.join(missing)}")
        self._special_ids = {t: backend.token_to_id(t) for t in QWEN3_SPECIAL_TOKENS}

    @functools.cached_property
    def _offsets_backend(self) -> tokenizers.Tokenizer:
        """The same tokenizer with a post-processor that never moves offsets (for loss masks)."""
        clone = tokenizers.Tokenizer.from_str(self.backend.to_str())
        clone.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        clone.no_truncation()
        clone.no_padding()
        return clone

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def load(cls, path_or_hub_id: str | os.PathLike) -> "Tokenizer":
        """Load our directory (with `tokenizer.json`), a hub id, or a transformers vocabulary directory.

        A local directory holding `tokenizer.json` is read directly. A hub id such as `Qwen/Qwen3-8B`,
        and a directory holding a byte-level BPE vocabulary as `vocab.json` + `merges.txt` instead, go
        through `transformers.AutoTokenizer`. A local directory with neither is a RunFileError naming
        it: a stage directory that lost its `tokenizer.json` must not be read as some other tokenizer
        that transformers assembles from what is left (from `tokenizer_config.json` alone it builds one
        that knows only the special tokens).
        """
        path = Path(path_or_hub_id)
        if path.is_dir() and not (path / "tokenizer.json").is_file() \
                and not all((path / name).is_file() for name in TRANSFORMERS_VOCABULARY):
            raise RunFileError(f"{path}: no tokenizer.json (nor {' + '.join(TRANSFORMERS_VOCABULARY)}): "
                               "not a tokenizer directory")
        if path.is_dir() and (path / "tokenizer.json").is_file():
            try:
                backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
                raise RunFileError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
            max_len = DEFAULT_MODEL_MAX_LENGTH
            config_file = path / "tokenizer_config.json"
            if config_file.is_file():
                config = read_json_object(config_file)
                value = config.get("model_max_length")
                if isinstance(value, int) and 0 < value < 10**12:
                    max_len = value
            return cls(backend, model_max_length=max_len)
        from transformers import AutoTokenizer  # full scale only: heavy import

        return cls.from_hf(AutoTokenizer.from_pretrained(str(path_or_hub_id)))

    @classmethod
    def from_hf(cls, hf_tokenizer: Any) -> "Tokenizer":
        """Wrap a transformers fast tokenizer (e.g. the released Qwen3 one)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(hf_tokenizer).__name__} has no backend_tokenizer (not a fast tokenizer)")
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        max_len = getattr(hf_tokenizer, "model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or not 0 < max_len < 10**12:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        return cls(backend, model_max_length=max_len)

    def save(self, directory: str | os.PathLike, *, model_max_length: int | None = None) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (with our chat template) to `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        added = {
            str(self._special_ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t in QWEN3_SKIPPABLE_TOKENS,
            }
            for t in QWEN3_SPECIAL_TOKENS
        }
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [t for t in QWEN3_SPECIAL_TOKENS[1:14]],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": int(model_max_length or self.model_max_length),
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        tmp = out / "tokenizer_config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(out / "tokenizer_config.json")
        return out

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids.

        Qwen3 adds no BOS/EOS around a text, so `add_special_tokens` changes nothing; it is kept
        for the familiar signature.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, for each token, its (start, end) character span in `text`."""
        enc = self._offsets_backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        tokenize: bool = True,
    ) -> str | list[int]:
        """Render `messages` with the Qwen3 chat template (see `qwen3repro.chat_template.render`)."""
        text = render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                      enable_thinking=enable_thinking)
        return self.encode(text) if tokenize else text

    # -- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included (151,669 for the released Qwen3)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    @property
    def eos_token_id(self) -> int:
        """`<|im_end|>`: the end of every chat turn (the released post-trained models' eos)."""
        return self._special_ids["<|im_end|>"]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids["<|endoftext|>"]

    @property
    def endoftext_id(self) -> int:
        """`<|endoftext|>`: the document separator in pre-training."""
        return self._special_ids["<|endoftext|>"]

    @property
    def im_start_id(self) -> int:
        return self._special_ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self._special_ids["<|im_end|>"]

    @property
    def think_start_id(self) -> int:
        return self._special_ids["<think>"]

    @property
    def think_end_id(self) -> int:
        return self._special_ids["</think>"]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"
