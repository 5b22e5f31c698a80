"""Data: a character tokenizer, the general corpus, and the synthetic knowledge corpus.

The base model is pretrained on two streams of text (see ``docs/experiments.md``):

- **General corpus** -- Python's own documentation, ``pydoc_data.topics`` (about 465 KB of real
  English prose that ships with every CPython, so nothing is downloaded). It is split into train /
  validation *by document*; the validation documents measure general capability, which is what
  fine-tuning forgets.
- **Knowledge corpus** -- invented entities that each live in an invented city, every fact written
  in four paraphrase templates, one template held out per entity. Seeing the same fact in several
  wordings teaches the base model that the templates mean the same thing, so an edit made in one
  template can generalize to the others (ELDER's "generality"); the held-out template measures
  whether recall generalizes at all before any editing.

Shape legend: B batch, T time (block_size).

Everything is deterministic given a seed and needs only NumPy and the standard library. Nothing is
read at import time; the pydoc corpus is loaded once, on first use, and cached. Note that
``pydoc_data.topics`` differs between Python versions, so corpus splits are reproducible only
within one Python version.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Character tokenizer

PAD_ID = 0
# The fixed vocabulary: token id i decodes to VOCAB[i]. Id 0 is PAD / end-of-text (decodes to
# ""), id 1 is "\n", ids 2..96 are the printable ASCII characters 32..126. Fixed rather than built
# from data, so that every corpus, task and edit shares the same ids.
VOCAB: tuple[str, ...] = ("", "\n") + tuple(chr(c) for c in range(32, 127))

# Unicode that pydoc (and people) use, written the ASCII way. Applied before NFKD because NFKD
# leaves curly quotes and dashes alone.
_ASCII_TABLE = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",   # single quotes
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',   # double quotes
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u00df": "ss",
    "\t": " ",
    "\r": "\n",
})
_OUTSIDE_VOCAB = re.compile(r"[^\n\x20-\x7e]")

# byte -> token id, for the characters of the vocabulary (all ASCII).
_ID_OF_BYTE = np.zeros(128, dtype=np.int64)
for _i, _ch in enumerate(VOCAB[1:], start=1):
    _ID_OF_BYTE[ord(_ch)] = _i


def count_outside_vocab(text: str) -> dict[str, int]:
    """{character: count} for the characters of text that are not in ``VOCAB``, in order of appearance."""
    counts: dict[str, int] = {}
    for m in _OUTSIDE_VOCAB.finditer(text):
        counts[m[0]] = counts.get(m[0], 0) + 1
    return counts


def _clip(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width - 3] + "...")


def normalize_text(text: str) -> str:
    """Map any text onto the vocabulary's characters; ``encode(text, errors="replace")`` applies it.

    In order: "\\r\\n" and "\\r" become "\\n"; tabs become one space; curly quotes and dashes become
    their ASCII forms and "ß" becomes "ss"; Unicode NFKD then spells out compatibility characters
    ("…" -> "...", "ﬁ" -> "fi", no-break space -> space) and splits accents off letters, which
    are dropped ("é" -> "e"); every character still outside the vocabulary becomes "?".
    """
    text = text.replace("\r\n", "\n").translate(_ASCII_TABLE)
    text = unicodedata.normalize("NFKD", text)
    return _OUTSIDE_VOCAB.sub(lambda m: "" if unicodedata.combining(m[0]) else "?", text)


class CharTokenizer:
    """Characters <-> token ids over the fixed ``VOCAB`` (97 tokens)."""

    vocab_size = len(VOCAB)
    pad_id = PAD_ID

    def encode(self, text: str, errors: str = "strict") -> np.ndarray:
        """str -> (len,) int64 ids.

        errors="strict" (the default): every character must be in ``VOCAB`` ("\\n" and printable
        ASCII); any other raises ValueError naming each one, so bad input is never silently changed.
        errors="replace": map the text with ``normalize_text`` first ("é" -> "e", "€" -> "?"). The
        corpora use this deliberately; call ``count_outside_vocab`` to see what it would change.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if errors == "replace":
            text = normalize_text(text)
        elif errors != "strict":
            raise ValueError(f'errors must be "strict" or "replace", got {errors!r}')
        else:
            outside = count_outside_vocab(text)
            if outside:
                first = _OUTSIDE_VOCAB.search(text).start()
                listed = ", ".join(f"{ch!r} (U+{ord(ch):04X}) ×{n}" for ch, n in list(outside.items())[:5])
                more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
                raise ValueError(f"encode: {sum(outside.values())} character(s) of {_clip(text)} are outside the "
                                 f"vocabulary (first at position {first}): {listed}{more}; the vocabulary is "
                                 '"\\n" and printable ASCII (space to "~"). Remove them, or pass '
                                 'errors="replace" to map them as normalize_text does ("é" -> "e", others -> "?").')
        return _ID_OF_BYTE[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]

    def decode(self, ids) -> str:
        """1-D sequence of ids -> str. PAD decodes to ""; nothing stops decoding early."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"decode takes a 1-D sequence of integer ids; got shape "
                             f"{ids.shape} of dtype {ids.dtype} (decode each row separately)")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"token id {int(ids[i])} at position {i} is outside the vocabulary; "
                             f"valid ids are 0..{self.vocab_size - 1}")
        return "".join(VOCAB[i] for i in ids.tolist())


# ----------------------------------------------------------------------------------------------
# General corpus: Python's documentation


@functools.lru_cache(maxsize=1)
def _pydoc_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics   # ~0.5 MB of text: imported on first use only

    return tuple(normalize_text(topics[name]).strip() for name in sorted(topics))


def pydoc_documents() -> list[str]:
    """The pydoc topic texts (normalized), sorted by topic name so the order never varies."""
    return list(_pydoc_documents())


def split_documents(docs, val_fraction: float = 0.1, seed: int = 0):
    """Split whole documents into (train_docs, val_docs), deterministically for a seed.

    Documents are visited in a shuffled order and each is moved into validation if it still fits
    in ``val_fraction`` of the *characters*; pydoc topics range from 200 characters to 62 K, so
    counting documents instead would make the validation size swing with the seed. Validation
    always gets at least one document and train keeps the rest; both keep the input order.
    """
    docs = list(docs)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {len(docs)}")
    _check_seed(seed)
    order = np.random.default_rng(seed).permutation(len(docs)).tolist()
    budget = val_fraction * sum(len(d) for d in docs)
    val_idx, val_chars = set(), 0
    for i in order:
        if val_chars + len(docs[i]) <= budget:
            val_idx.add(i)
            val_chars += len(docs[i])
    if not val_idx:                          # every document alone is over budget
        val_idx.add(order[0])
    if len(val_idx) == len(docs):            # only possible for empty documents
        val_idx.discard(order[-1])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


# ----------------------------------------------------------------------------------------------
# Synthetic knowledge corpus: invented entities living in invented cities

# Each template is (prompt, answer); the fact line is prompt + answer, and the answer is always
# the city and a full stop, so recall is an exact match of the greedy continuation.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{e} lives in ", "{c}."),
    ("The home city of {e} is ", "{c}."),
    ("Where does {e} live? ", "{c}."),
    ("{e} is a resident of ", "{c}."),
)
SPLITS = ("train", "heldout")

# Pronounceable invented names. An entity is two consonant-vowel-consonant syllables ("Zorbin");
# a city is one syllable plus a place-like ending ("Quelmere"), so the two kinds look different.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "qu", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "s", "m", "th")
_CITY_ENDINGS = ("mere", "holm", "dale", "ford", "wick", "gard", "vale", "stead")


def _syllable(rng: np.random.Generator) -> str:
    return (_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))])


def _entity_name(rng: np.random.Generator) -> str:
    return (_syllable(rng) + _syllable(rng)).capitalize()


def _city_name(rng: np.random.Generator) -> str:
    return (_syllable(rng) + _CITY_ENDINGS[rng.integers(len(_CITY_ENDINGS))]).capitalize()


def _invent(make_name, n: int, rng: np.random.Generator, exclude=()) -> list[str]:
    """n distinct names from make_name(rng), none of them in exclude."""
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"number of names must be a non-negative int, got {n!r}")
    taken, names, misses = set(exclude), [], 0
    while len(names) < n:
        name = make_name(rng)
        if name in taken:
            misses += 1
            if misses > 10_000:              # the name space is (nearly) used up
                raise ValueError(f"could invent only {len(names)} distinct names of the {n} "
                                 f"asked for; ask for fewer")
            continue
        taken.add(name)
        names.append(name)
    return names


def render(entity: str, city: str, template_id: int) -> tuple[str, str]:
    """The fact "entity lives in city" in one template, as (prompt, answer)."""
    if not (isinstance(template_id, (int, np.integer)) and 0 <= template_id < len(TEMPLATES)):
        raise ValueError(f"template_id must be an int in 0..{len(TEMPLATES) - 1}, "
                         f"got {template_id!r}")
    prompt, answer = TEMPLATES[template_id]
    return prompt.format(e=entity), answer.format(c=city)


@dataclass
class KnowledgeBase:
    """Who lives where, and which template of each entity's fact is held out of training."""

    entities: list[str]
    cities: list[str]
    city_of: dict[str, str]             # entity -> city
    heldout_template: dict[str, int]    # entity -> the template id never seen in training
    seed: int

    render = staticmethod(render)

    def prompts(self, split: str = "train") -> list[tuple[str, str, str, int]]:
        """(prompt, answer, entity, template_id) for every fact in the split, in entity order.

        "train": the three templates each entity is trained on; "heldout": the fourth.
        """
        _check_split(split, SPLITS)
        rows = []
        for e in self.entities:
            for t in range(len(TEMPLATES)):
                if (t == self.heldout_template[e]) == (split == "heldout"):
                    rows.append((*render(e, self.city_of[e], t), e, t))
        return rows

    def fact_lines(self, split: str = "train") -> list[str]:
        """The facts of a split as whole lines of text, prompt + answer."""
        return [prompt + answer for prompt, answer, _, _ in self.prompts(split)]

    def new_entity_names(self, n: int, seed: int = 0) -> list[str]:
        """n invented entity names, distinct and not among this base's entities or cities."""
        _check_seed(seed)
        return _invent(_entity_name, n, np.random.default_rng([seed, 1]),
                       exclude=self.entities + self.cities)

    def new_city_names(self, n: int, seed: int = 0) -> list[str]:
        """n invented city names, distinct and not among this base's entities or cities."""
        _check_seed(seed)
        return _invent(_city_name, n, np.random.default_rng([seed, 2]),
                       exclude=self.entities + self.cities)


def make_knowledge_base(n_entities: int = 100, n_cities: int = 20, seed: int = 0) -> KnowledgeBase:
    """Invent entities and cities and give each entity one city, deterministically for a seed.

    Cities are dealt round-robin then shuffled, so each city has (nearly) the same number of
    residents and guessing the most common city scores no better than chance (1 / n_cities).
    Held-out templates are balanced across entities the same way.
    """
    for name, value in (("n_entities", n_entities), ("n_cities", n_cities)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    entities = _invent(_entity_name, n_entities, rng)
    cities = _invent(_city_name, n_cities, rng, exclude=entities)
    homes = rng.permutation(np.arange(n_entities) % n_cities)
    heldout = rng.permutation(np.arange(n_entities) % len(TEMPLATES))
    return KnowledgeBase(
        entities=entities,
        cities=cities,
        city_of={e: cities[h] for e, h in zip(entities, homes.tolist())},
        heldout_template={e: t for e, t in zip(entities, heldout.tolist())},
        seed=seed,
    )


# ----------------------------------------------------------------------------------------------
# Pretraining stream: random windows of pydoc text and of knowledge lines

KNOWLEDGE_PASSES = 10   # shuffled passes over the fact lines, so windows see many orderings


class PretrainData:
    """Batches for pretraining the base model: pydoc text mixed with the knowledge corpus.

    Train rows come from two token streams: the train pydoc documents joined by "\\n\\n", and the
    train-template fact lines, one per line, in ``KNOWLEDGE_PASSES`` shuffled passes. A fraction
    ``knowledge_fraction`` of each train batch is knowledge rows. Validation batches come from the
    validation pydoc documents only: they measure general capability (knowledge recall is measured
    separately with ``kb.prompts("heldout")``). ``streams`` holds the three token streams
    ("train", "val", "knowledge") as uint8 arrays; ``kb`` is the knowledge base.
    """

    def __init__(self, tokenizer: CharTokenizer | None = None, block_size: int = 128,
                 knowledge_fraction: float = 0.3, seed: int = 0, n_entities: int = 100,
                 n_cities: int = 20, val_fraction: float = 0.1):
        if not (isinstance(block_size, (int, np.integer)) and block_size >= 1):
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not 0 <= knowledge_fraction <= 1:
            raise ValueError(f"knowledge_fraction must be in [0, 1], got {knowledge_fraction!r}")
        _check_seed(seed)
        self.tokenizer = tokenizer or CharTokenizer()
        self.block_size = int(block_size)
        self.knowledge_fraction = float(knowledge_fraction)
        self.seed = seed

        # uint8 streams (97 ids fit) keep the corpus small; batches are cast to int64.
        def stream(name, text):
            ids = self.tokenizer.encode(text, errors="replace").astype(np.uint8)  # the corpus maps deliberately
            if len(ids) < self.block_size + 1:
                raise ValueError(f"the {name} stream has {len(ids)} tokens, fewer than "
                                 f"block_size + 1 = {self.block_size + 1}; use a smaller block_size")
            return ids

        self.train_docs, self.val_docs = split_documents(pydoc_documents(), val_fraction, seed)
        self.streams = {"train": stream("train", "\n\n".join(self.train_docs)),
                        "val": stream("val", "\n\n".join(self.val_docs))}

        self.kb = make_knowledge_base(n_entities, n_cities, seed)
        lines = self.kb.fact_lines("train")
        rng = np.random.default_rng([seed, 3])
        # Enough passes that a window always fits, however few facts there are.
        passes = max(KNOWLEDGE_PASSES, math.ceil((block_size + 1) / len("\n".join(lines))) + 1)
        self.streams["knowledge"] = stream("knowledge", "\n".join(
            lines[i] for _ in range(passes) for i in rng.permutation(len(lines))))

    def _windows(self, name: str, starts: np.ndarray):
        """(x, y) int64 (B, T) windows of a stream at the given starts; y is x shifted by one."""
        idx = starts[:, None] + np.arange(self.block_size + 1)   # (B, T + 1)
        chunk = self.streams[name][idx].astype(np.int64)
        return chunk[:, :-1], chunk[:, 1:]

    def get_batch(self, split: str, batch_size: int, rng: np.random.Generator):
        """A random batch (x, y), each int64 (B, T), with y[:, t] = the token after x[:, t].

        For "train" the first rows are knowledge windows: ``knowledge_fraction * B`` of them,
        rounded up or down at random so that the expected share is exact even for small B.
        """
        _check_split(split, ("train", "val"))
        _check_batch_size(batch_size)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), "
                            f"got {type(rng).__name__}")
        if split == "val":
            parts = [("val", batch_size)]
        else:
            k = self.knowledge_fraction * batch_size
            n_know = int(k) + int(rng.random() < k - int(k))
            parts = [("knowledge", n_know), ("train", batch_size - n_know)]
        xs, ys = [], []
        for name, n in parts:
            starts = rng.integers(0, len(self.streams[name]) - self.block_size, size=n)
            x, y = self._windows(name, starts)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    def val_batches(self, batch_size: int, n_batches: int):
        """A fixed list of n_batches validation (x, y) batches: windows evenly spaced over the
        validation text, the same on every call, so validation losses compare across runs."""
        _check_batch_size(batch_size)
        if not (isinstance(n_batches, (int, np.integer)) and n_batches >= 1):
            raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")
        last = len(self.streams["val"]) - self.block_size - 1
        starts = np.linspace(0, last, batch_size * n_batches).astype(np.int64)
        return [self._windows("val", s) for s in starts.reshape(n_batches, batch_size)]


# ----------------------------------------------------------------------------------------------
# Argument checks shared above


def _check_split(split, allowed) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(map(repr, allowed))}; got {split!r}")


def _check_seed(seed) -> None:
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _check_batch_size(batch_size) -> None:
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
