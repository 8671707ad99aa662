"""Byte-level BPE tokenizer: training (``train_bpe``) and a thin, fast wrapper (``Tokenizer``).

Built on the Hugging Face ``tokenizers`` library; pure (no store, no services).

Choices worth knowing:

* **Byte level, lossless.** The pre-tokenizer first splits text with ``SPLIT_PATTERN``
  (below), then maps every UTF-8 byte to a printable character (GPT-2 style ``ByteLevel``);
  all 256 bytes are in the initial alphabet, so any UTF-8 text (CJK, emoji, code) encodes,
  and ``decode(encode(text))`` gives back ``text`` exactly. No Unicode normaliser runs: the
  curation stage already normalised the text, and a tokenizer that changes text would
  break bits-per-byte accounting.
* **Split pattern.** Our variant of the GPT-4 (cl100k) family of split regexes: English
  contractions; a letter run with at most one leading non-letter (so " word" and "_name"
  are one piece); digits in groups of at most three (so numbers never merge into huge
  tokens and "2024" is "202"+"4"); punctuation runs with one optional leading space;
  newline runs together with the indentation before them; whitespace runs that leave
  their last space for the following word (keeps Python indentation compact). CJK has no
  spaces, so a CJK run is one piece and BPE learns merges inside it.
* **Special tokens** get ids 0..6 in the order of ``SPECIAL_TOKENS``: ``<|bos|>``,
  ``<|eos|>``, ``<|pad|>`` (all distinct: pad is never eos, so the end token stays in the
  loss) and the chat markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``
  for SFT.
* **User text never produces special ids.** ``encode`` treats the literal string
  ``"<|eos|>"`` in plain text as ordinary bytes (the HF flag ``encode_special_tokens`` is
  on), so a scraped web page or a prompt cannot inject control tokens. Code that builds
  chat templates passes ``allow_special=True`` (a second HF instance with the flag off;
  the flag is per instance, so toggling it per call would not be thread-safe) or, better,
  inserts ``special_ids[...]`` directly.
* Shape suffixes: ``_N`` one entry per token, ``_D`` one per document.
* BOS/EOS are added here, in Python, not by an HF post-processor, so ``tokenizer.json``
  stays a plain BPE file that other tools load unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)

SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"  # contractions: 's 'd 'm 't 'll 've 're
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"  # a letter run (any script) with at most one leading non-letter
    r"|\p{N}{1,3}"  # digits, at most three per piece
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation / symbols, one optional leading space
    r"|\s*[\r\n]+"  # newlines with the indentation before them
    r"|\s+(?!\S)"  # whitespace not followed by a word (its last space goes to the word)
    r"|\s+"
)

NUM_BYTE_TOKENS = 256


class Tokenizer:
    """A byte-level BPE tokenizer with moeflow's special tokens; wraps ``tokenizers.Tokenizer``."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with train_bpe")
        self._json = hf.to_str()
        self._hf = hf
        self._hf.encode_special_tokens = True  # plain text: "<|eos|>" is just bytes
        self._hf_special: HFTokenizer | None = None  # built on first allow_special=True call
        self.special_ids: dict[str, int] = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id = self.special_ids[BOS]
        self.eos_id = self.special_ids[EOS]
        self.pad_id = self.special_ids[PAD]
        self.training_stats: dict = {}

    # ---- persistence ----
    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(HFTokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, data: str | bytes) -> Tokenizer:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return cls(HFTokenizer.from_str(data))

    def to_str(self) -> str:
        """The ``tokenizer.json`` text (deterministic for a given trained tokenizer)."""
        return self._json

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._json, encoding="utf-8")
        return path

    def __getstate__(self) -> dict:  # ships to Ray workers as its JSON
        return {"json": self._json, "training_stats": self.training_stats}

    def __setstate__(self, state: dict) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]))
        self.training_stats = state.get("training_stats", {})

    # ---- vocabulary ----
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    # ---- encoding ----
    def _backend(self, allow_special: bool) -> HFTokenizer:
        if not allow_special:
            return self._hf
        if self._hf_special is None:
            self._hf_special = HFTokenizer.from_str(self._json)
            self._hf_special.encode_special_tokens = False
        return self._hf_special

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._backend(allow_special).encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """Encodes many texts at once (multi-threaded inside ``tokenizers``)."""
        encodings = self._backend(allow_special).encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def encode_batch_flat(
        self,
        texts: Sequence[str],
        add_bos: bool = True,
        add_eos: bool = True,
        dtype=np.uint32,
        chunk_chars: int = 1_000_000,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts into one flat array: (tokens_N, lengths_D), each text wrapped in bos/eos.

        The fast path for token shards: no per-token Python work beyond what ``tokenizers``
        hands back, and numpy arrays (cheap to ship between Ray workers). Texts longer than
        ``chunk_chars`` are encoded in pieces cut at pre-token boundaries (same ids as one
        piece, see ``split_at_pretoken_boundaries``): a 100 MB document would otherwise
        make ``tokenizers`` hold per-token strings and offsets for all of it at once.
        """
        doc_of_piece: list[int] = []
        pieces_text: list[str] = []
        for d, text in enumerate(texts):
            for piece in split_at_pretoken_boundaries(text, chunk_chars):
                doc_of_piece.append(d)
                pieces_text.append(piece)
        encodings = self._hf.encode_batch_fast(pieces_text, add_special_tokens=False)
        extra = int(add_bos) + int(add_eos)
        lengths_D = np.full(len(texts), extra, dtype=np.int64)
        ids_of_doc: list[list[np.ndarray]] = [[] for _ in texts]
        for d, enc in zip(doc_of_piece, encodings):
            ids = np.asarray(enc.ids, dtype=dtype)
            ids_of_doc[d].append(ids)
            lengths_D[d] += len(ids)
        pieces: list[np.ndarray] = []
        bos = np.array([self.bos_id], dtype=dtype)
        eos = np.array([self.eos_id], dtype=dtype)
        for doc_ids in ids_of_doc:
            if add_bos:
                pieces.append(bos)
            pieces.extend(doc_ids)
            if add_eos:
                pieces.append(eos)
        tokens_N = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        return tokens_N, lengths_D

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def bytes_per_token(self, texts: Iterable[str], batch_size: int = 256) -> float:
        """UTF-8 bytes per token over ``texts`` (no bos/eos counted): the compression of this tokenizer."""
        num_bytes = num_tokens = 0
        for batch in _batched(texts, batch_size):
            num_bytes += sum(len(t.encode("utf-8")) for t in batch)
            num_tokens += sum(len(e.ids) for e in self._hf.encode_batch_fast(batch, add_special_tokens=False))
        if num_tokens == 0:
            raise ValueError("bytes_per_token needs at least one non-empty text")
        return num_bytes / num_tokens

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


# Positions where a pre-token always starts under SPLIT_PATTERN: a space right after a
# non-space (no piece ends in a space unless the space run is all it holds), and a
# non-space right after a newline (newline runs end their piece; a letter run never takes
# a newline as its leading character). Cutting there changes no ids.
_SAFE_CUT = re.compile(r"(?<=\S) |(?<=\n)(?=\S)")


def split_at_pretoken_boundaries(text: str, max_chars: int) -> list[str]:
    """``text`` cut into pieces of roughly ``max_chars`` at safe pre-token boundaries.

    Encoding the pieces separately gives exactly the ids of the whole text. A piece grows
    past ``max_chars`` only when no safe cut exists (e.g. one huge line without spaces).
    """
    if len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        match = _SAFE_CUT.search(text, start + max_chars)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _new_hf_tokenizer() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())  # no unk token: byte level covers every input
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    max_train_bytes: int | None = None,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer on ``texts``.

    ``vocab_size`` counts everything (256 byte tokens, special tokens, merges); a small
    corpus may end with fewer merges than asked for. ``max_train_bytes`` stops reading
    ``texts`` once that many UTF-8 bytes were taken (the text that crosses the budget is
    cut at the budget): callers that want a representative sample pass an already
    sampled stream (``platform/data/tokenize.py`` samples by document-id hash).
    """
    special_tokens = list(special_tokens)
    missing = [t for t in SPECIAL_TOKENS if t not in special_tokens]
    if missing:
        raise ValueError(f"special_tokens must include {missing}")
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must be distinct, got {special_tokens}")
    min_vocab = NUM_BYTE_TOKENS + len(special_tokens) + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least {min_vocab} (bytes + specials + 1 merge)")
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise ValueError(f"max_train_bytes must be positive, got {max_train_bytes}")

    stats = {"num_train_texts": 0, "num_train_bytes": 0}

    def budgeted() -> Iterator[str]:
        for text in texts:
            if not text:
                continue
            data = text.encode("utf-8")
            if max_train_bytes is not None and stats["num_train_bytes"] + len(data) > max_train_bytes:
                room = max_train_bytes - stats["num_train_bytes"]
                if room > 0:  # cut at a character boundary
                    part = data[:room].decode("utf-8", errors="ignore")
                    stats["num_train_texts"] += 1
                    stats["num_train_bytes"] += len(part.encode("utf-8"))
                    yield part
                return
            stats["num_train_texts"] += 1
            stats["num_train_bytes"] += len(data)
            yield text

    hf = _new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(budgeted(), trainer=trainer)
    if stats["num_train_texts"] == 0:
        raise ValueError("train_bpe got no non-empty text to train on")
    tok = Tokenizer(hf)
    tok.training_stats = {**stats, "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size,
                          "min_frequency": min_frequency}
    return tok


def tokenizer_info(tok: Tokenizer) -> dict:
    """Small JSON-able summary (for meta files and tracking)."""
    return json.loads(json.dumps({
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "special_ids": tok.special_ids,
        "split_pattern": SPLIT_PATTERN,
        **({"training": tok.training_stats} if tok.training_stats else {}),
    }))
