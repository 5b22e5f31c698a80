"""Tests for tinyslim.data: tokenizer, corpora, knowledge base, pretraining batches."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinyslim.data import (
    TEMPLATES,
    VOCAB,
    CharTokenizer,
    PretrainData,
    count_outside_vocab,
    make_knowledge_base,
    normalize_text,
    pydoc_documents,
    render,
    split_documents,
)

tok = CharTokenizer()


@pytest.fixture(scope="module")
def data():
    return PretrainData(tok, block_size=32, knowledge_fraction=0.5, seed=0)


def is_window_of(row_x, row_y, stream):
    """True if x followed by y's last token is a contiguous piece of the stream."""
    piece = np.append(row_x, row_y[-1]).astype(np.uint8).tobytes()
    return piece in stream.tobytes()


# ---- tokenizer ---------------------------------------------------------------------------------


def test_vocab_is_pad_newline_and_printable_ascii():
    assert tok.vocab_size == len(VOCAB) == 97
    assert VOCAB[0] == "" and VOCAB[1] == "\n"
    assert "".join(VOCAB[2:]) == "".join(chr(c) for c in range(32, 127))


@given(st.text(alphabet=st.sampled_from(VOCAB[1:])))
def test_round_trip_on_vocab_text(text):
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text


@given(st.text())
def test_any_text_encodes_into_the_vocab_with_replace_and_raises_or_round_trips_when_strict(text):
    ids = tok.encode(text, errors="replace")
    assert ((ids >= 1) & (ids < tok.vocab_size)).all()      # PAD is never produced by text
    assert tok.decode(ids) == normalize_text(text)
    assert normalize_text(normalize_text(text)) == normalize_text(text)
    outside = count_outside_vocab(text)
    if outside:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.encode(text)
    else:
        assert tok.decode(tok.encode(text)) == text


def test_strict_encode_names_what_was_given_what_is_allowed_and_what_to_do():
    with pytest.raises(ValueError) as info:
        tok.encode("h\u00e9llo \u20ac")
    message = str(info.value)
    assert "\n" not in message                                 # one line
    assert "2 character(s) of 'h\u00e9llo \u20ac'" in message and "(first at position 1)" in message
    assert "'\u00e9' (U+00E9) ×1, '\u20ac' (U+20AC) ×1" in message
    assert "printable ASCII" in message and 'errors="replace"' in message
    assert tok.decode(tok.encode("h\u00e9llo \u20ac", errors="replace")) == "hello ?"
    assert count_outside_vocab("a\tb\t\u00e9") == {"\t": 2, "\u00e9": 1}
    with pytest.raises(ValueError, match="errors must be"):
        tok.encode("a", errors="ignore")


@pytest.mark.parametrize("raw, expected", [
    ("a\tb", "a b"),
    ("\u201cquoted\u201d it\u2019s", "\"quoted\" it's"),
    ("a \u2014 b \u2013 c", "a - b - c"),
    ("caf\u00e9 na\u00efve", "cafe naive"),
    ("wait\u2026", "wait..."),
    ("Stra\u00dfe", "Strasse"),
    ("\ufb01ne\u00a0day", "fine day"),
    ("line\r\nnext\rlast", "line\nnext\nlast"),
    ("20\u00b0 \u65e5\u672c \x00", "20? ?? ?"),
])
def test_unknown_character_rule(raw, expected):
    assert tok.decode(tok.encode(raw, errors="replace")) == expected


def test_pad_decodes_to_nothing():
    a = tok.encode("a")[0]
    assert tok.decode([0, a, 0, 0]) == "a"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("ids, match", [
    ([5, 97], r"token id 97 at position 1 .*valid ids are 0\.\.96"),
    ([-1], r"token id -1 at position 0"),
    ([[1, 2]], r"1-D"),
    ([1.0, 2.0], r"integer"),
])
def test_decode_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        tok.decode(ids)


def test_encode_rejects_non_text():
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes")


# ---- general corpus ----------------------------------------------------------------------------


def test_pydoc_documents_are_normalized_and_stable():
    docs = pydoc_documents()
    assert len(docs) > 50 and docs == pydoc_documents()
    assert all(doc and normalize_text(doc) == doc for doc in docs)
    assert 400_000 < sum(map(len, docs)) < 600_000


@given(docs=st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=30, unique=True),
       val_fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**32))
def test_split_is_disjoint_and_covers_everything(docs, val_fraction, seed):
    train, val = split_documents(docs, val_fraction, seed)
    assert train and val
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert split_documents(docs, val_fraction, seed) == (train, val)


def test_pydoc_split_is_seeded_and_about_the_asked_fraction():
    docs = pydoc_documents()
    train0, val0 = split_documents(docs, 0.1, seed=0)
    assert split_documents(docs, 0.1, seed=0) == (train0, val0)
    assert split_documents(docs, 0.1, seed=1) != (train0, val0)
    share = sum(map(len, val0)) / sum(map(len, docs))
    assert 0.09 < share <= 0.1


@pytest.mark.parametrize("args, match", [
    ((["a", "b"], 0.0), r"val_fraction must be in \(0, 1\), got 0.0"),
    ((["a", "b"], 1.0), r"val_fraction"),
    ((["a"], 0.5), r"need at least 2 documents to split into train and val, got 1"),
    ((["a", "b"], 0.5, -1), r"seed must be a non-negative int, got -1"),
])
def test_split_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        split_documents(*args)


# ---- knowledge base ----------------------------------------------------------------------------


def test_knowledge_base_is_seeded():
    assert make_knowledge_base(seed=3) == make_knowledge_base(seed=3)
    assert make_knowledge_base(seed=3).entities != make_knowledge_base(seed=4).entities


@pytest.mark.parametrize("n_entities, n_cities", [(100, 20), (7, 3), (1, 1)])
def test_knowledge_base_names_and_held_out_templates(n_entities, n_cities):
    kb = make_knowledge_base(n_entities, n_cities, seed=0)
    assert len(set(kb.entities)) == n_entities and len(set(kb.cities)) == n_cities
    assert not set(kb.entities) & set(kb.cities)
    assert set(kb.city_of) == set(kb.entities) and set(kb.city_of.values()) <= set(kb.cities)
    # cities are dealt evenly: no city has more than one resident above another
    counts = [list(kb.city_of.values()).count(c) for c in kb.cities]
    assert max(counts) - min(counts) <= 1

    train, heldout = kb.prompts("train"), kb.prompts("heldout")
    assert len(heldout) == n_entities and len(train) == (len(TEMPLATES) - 1) * n_entities
    for entity in kb.entities:
        held = [t for _, _, e, t in heldout if e == entity]
        seen = [t for _, _, e, t in train if e == entity]
        assert held == [kb.heldout_template[entity]]
        assert sorted(held + seen) == list(range(len(TEMPLATES)))


def test_facts_render_into_the_vocab():
    kb = make_knowledge_base(seed=0)
    for split in ("train", "heldout"):
        lines = kb.fact_lines(split)
        for (prompt, answer, entity, _), line in zip(kb.prompts(split), lines):
            assert line == prompt + answer and answer == kb.city_of[entity] + "."
            assert entity in prompt
            assert tok.decode(tok.encode(line)) == line      # nothing was replaced by "?"


def test_render_every_template():
    rendered = [render("Zorbin", "Quelmere", t) for t in range(len(TEMPLATES))]
    assert rendered[0] == ("Zorbin lives in ", "Quelmere.")
    assert len({p for p, _ in rendered}) == len(TEMPLATES)
    assert make_knowledge_base(3, 2).render("Zorbin", "Quelmere", 2) == rendered[2]
    with pytest.raises(ValueError, match=r"template_id must be an int in 0\.\.3, got 4"):
        render("Zorbin", "Quelmere", 4)


def test_new_names_are_fresh_and_seeded():
    kb = make_knowledge_base(seed=0)
    base = set(kb.entities) | set(kb.cities)
    entities, cities = kb.new_entity_names(50, seed=1), kb.new_city_names(10, seed=1)
    assert len(set(entities)) == 50 and len(set(cities)) == 10
    assert not (set(entities) | set(cities)) & base
    assert not set(entities) & set(cities)
    assert kb.new_entity_names(50, seed=1) == entities
    assert kb.new_entity_names(50, seed=2) != entities
    assert kb.new_city_names(0) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"n_entities": 0}, r"n_entities must be an int >= 1, got 0"),
    ({"n_cities": 2.5}, r"n_cities must be an int >= 1, got 2.5"),
    ({"n_cities": 10**6}, r"could invent only \d+ distinct names"),
    ({"seed": "a"}, r"seed must be a non-negative int"),
])
def test_knowledge_base_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_knowledge_base(**kwargs)


def test_prompts_reject_unknown_split():
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'heldout'; got 'val'"):
        make_knowledge_base(3, 2).prompts("val")


# ---- pretraining batches -----------------------------------------------------------------------


def test_batches_are_shifted_windows_of_their_streams(data):
    x, y = data.get_batch("train", 8, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    # knowledge_fraction 0.5 of 8 rows: the first 4 are facts, the rest pydoc text
    assert all(is_window_of(x[i], y[i], data.streams["knowledge"]) for i in range(4))
    assert all(is_window_of(x[i], y[i], data.streams["train"]) for i in range(4, 8))

    xv, yv = data.get_batch("val", 5, np.random.default_rng(0))
    assert xv.shape == (5, 32) and (xv[:, 1:] == yv[:, :-1]).all()
    assert all(is_window_of(xv[i], yv[i], data.streams["val"]) for i in range(5))


def test_streams_hold_the_right_documents(data):
    assert not set(data.train_docs) & set(data.val_docs)
    assert tok.decode(data.streams["val"]) == "\n\n".join(data.val_docs)
    knowledge = tok.decode(data.streams["knowledge"])
    assert set(knowledge.split("\n")) == set(data.kb.fact_lines("train"))  # no held-out facts


@pytest.mark.parametrize("fraction, stream", [(0.0, "train"), (1.0, "knowledge")])
def test_knowledge_fraction_extremes(fraction, stream):
    d = PretrainData(tok, block_size=16, knowledge_fraction=fraction, seed=0)
    x, y = d.get_batch("train", 16, np.random.default_rng(1))
    assert all(is_window_of(x[i], y[i], d.streams[stream]) for i in range(16))


def test_knowledge_share_is_right_on_average_for_tiny_batches():
    d = PretrainData(tok, block_size=16, knowledge_fraction=0.3, seed=0)
    rng = np.random.default_rng(0)
    rows = [d.get_batch("train", 1, rng) for _ in range(400)]
    share = np.mean([is_window_of(x[0], y[0], d.streams["knowledge"]) for x, y in rows])
    assert 0.22 < share < 0.38


def test_batches_are_seeded():
    a = PretrainData(tok, block_size=16, seed=0)
    b = PretrainData(tok, block_size=16, seed=0)
    c = PretrainData(tok, block_size=16, seed=1)
    batch_a = a.get_batch("train", 8, np.random.default_rng(5))
    batch_b = b.get_batch("train", 8, np.random.default_rng(5))
    assert all((p == q).all() for p, q in zip(batch_a, batch_b))
    assert not (a.get_batch("train", 8, np.random.default_rng(6))[0] == batch_a[0]).all()
    assert a.val_docs == b.val_docs and a.val_docs != c.val_docs
    assert (a.streams["knowledge"] == b.streams["knowledge"]).all()
    assert a.kb.entities != c.kb.entities


def test_val_batches_are_fixed(data):
    batches = data.val_batches(4, 3)
    again = data.val_batches(4, 3)
    assert len(batches) == 3
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == y.shape == (4, 32) and x.dtype == np.int64
        assert (x == x2).all() and (y == y2).all() and (x[:, 1:] == y[:, :-1]).all()
        assert all(is_window_of(x[i], y[i], data.streams["val"]) for i in range(4))


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 0}, r"block_size must be an int >= 1, got 0"),
    ({"knowledge_fraction": 1.5}, r"knowledge_fraction must be in \[0, 1\], got 1.5"),
    ({"knowledge_fraction": -0.1}, r"knowledge_fraction must be in \[0, 1\], got -0.1"),
    ({"block_size": 10**7}, r"the train stream has \d+ tokens, fewer than block_size \+ 1"),
])
def test_pretrain_data_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainData(tok, **kwargs)


def test_get_batch_rejects_bad_arguments(data):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val'; got 'test'"):
        data.get_batch("test", 4, rng)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        data.get_batch("train", 0, rng)
    with pytest.raises(TypeError, match=r"np.random.default_rng\(seed\)"):
        data.get_batch("train", 4, 0)
    with pytest.raises(ValueError, match=r"n_batches must be an int >= 1, got 0"):
        data.val_batches(4, 0)
