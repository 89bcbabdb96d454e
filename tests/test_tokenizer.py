import json

import pytest

from rlhf_lightning.tasks.arithmetic import ALPHABET, problems
from rlhf_lightning.tokenizer import CharTokenizer, Tokenizer, UnknownCharacterError, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(ALPHABET)


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len(set(ALPHABET)) == 21
    # characters follow the specials, sorted
    assert tok.encode("\n") == [3]
    assert tok.encode("Q") == [tok.vocab_size - 1]
    assert tok.encode("0123456789") == list(range(7, 17))


def test_alphabet_is_sorted_unique():
    t = CharTokenizer("cbaab")
    assert t.alphabet == "abc"
    assert t.vocab_size == 6
    assert t.encode("abc") == [3, 4, 5]
    assert CharTokenizer(["c", "a", "b"]) == t
    with pytest.raises(ValueError, match="alphabet entries must be single characters, got 'ab'"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="alphabet must contain at least one character"):
        CharTokenizer("")


def test_prompt_and_completion_specials(tok):
    assert tok.encode_prompt("12") == [1] + tok.encode("12")
    assert tok.encode_completion("12") == tok.encode("12") + [2]
    assert tok.encode("") == []
    assert tok.encode_prompt("") == [1]
    assert tok.encode_completion("") == [2]


def test_round_trip_every_toy_problem(tok):
    ps = problems()
    assert len(ps) == 15050
    for p in ps:
        text = p.prompt + p.answer
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
        full = tok.encode_prompt(p.prompt) + tok.encode_completion(p.answer)
        assert tok.decode(full) == text


def test_decode_stops_at_eos_and_drops_pad_bos(tok):
    ids = [0, 0, 1] + tok.encode("Q: 1+1=\nA:2") + [2] + tok.encode("99") + [0]
    assert tok.decode(ids) == "Q: 1+1=\nA:2"
    assert tok.decode([2] + tok.encode("5")) == ""
    assert tok.decode([]) == ""
    with pytest.raises(ValueError, match="token id 21 is out of range for a vocabulary of 21"):
        tok.decode([tok.vocab_size])


def test_unknown_character_error_names_char_index_and_where(tok):
    with pytest.raises(UnknownCharacterError) as ei:
        tok.encode("Q: 1x2", where="data.jsonl:7 field 'prompt'")
    err = ei.value
    assert isinstance(err, ValueError)
    assert (err.char, err.index, err.where) == ("x", 4, "data.jsonl:7 field 'prompt'")
    msg = str(err)
    assert "'x'" in msg
    assert "index 4" in msg
    assert "data.jsonl:7 field 'prompt'" in msg
    # without `where`, and through the prompt/completion helpers
    with pytest.raises(UnknownCharacterError, match=r"'\\t' at index 0"):
        tok.encode_prompt("\t")
    with pytest.raises(UnknownCharacterError, match="where-c"):
        tok.encode_completion("12a", where="where-c")


def test_dict_and_json_round_trip(tok):
    d = tok.to_dict()
    assert d == {"type": "char", "alphabet": ALPHABET}
    assert json.loads(json.dumps(d)) == d
    assert CharTokenizer.from_dict(d) == tok
    loaded = load_tokenizer(json.loads(json.dumps(d)))
    assert loaded == tok and isinstance(loaded, Tokenizer)
    assert loaded.encode("Q: 5-3=\nA:2") == tok.encode("Q: 5-3=\nA:2")
    assert CharTokenizer("ab") != tok
    with pytest.raises(ValueError, match="type"):
        CharTokenizer.from_dict({"type": "bpe", "alphabet": "ab"})
