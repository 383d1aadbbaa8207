"""A row's end and text (mtj.decode.stops.RowText): the same text, finish reason and kept tokens as decoding
the whole row and cutting it at the first stop string, at a cost per token that does not grow with the row."""

import numpy as np
import pytest

from conftest import assets
from mtj.decode.stops import RowText, truncate_at_stop
from mtj.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


class Counting:
    """The real tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


def rows(tok, rng, count):
    text = (assets() / "text" / "tinyshakespeare.txt").read_text()[:30000] + " é 漢字 🙂 naïve — “quoted”"
    ids = tok.encode(text)
    for trial in range(count):
        start = int(rng.integers(0, len(ids) - 300))
        row = ids[start:start + int(rng.integers(1, 300))]
        if trial % 3 == 0:  # random ids: characters split across tokens everywhere
            row = [int(t) for t in rng.integers(0, tok.vocab_size - 1, len(row))]
        yield row


def test_the_row_ends_and_reads_as_the_whole_decode_cut_at_the_first_stop(tok):
    rng = np.random.default_rng(0)
    eos = tok.eos_id
    stopped = 0
    for trial, row in enumerate(rows(tok, rng, 300)):
        stops = [s for s in ["\n\n", "ROMEO", "the king", ".", "ï", "zzz", ""] if rng.random() < 0.3]
        if trial % 4 == 0 and len(row) > 3:
            row[int(rng.integers(0, len(row)))] = eos
        max_new = int(rng.integers(1, len(row) + 3))
        text = RowText(tok, eos, stops, max_new)
        shown = ""
        for t in row:
            ended = text.append(t)
            assert text.ready().startswith(shown) and text.ready() in text.text
            shown = text.ready()
            if ended:
                break
        text.end("length")  # the tokens ran out
        # the rule it replaces: decode everything generated, cut at the first stop string
        full = tok.decode([t for t in text.tokens if t != eos])
        assert text.text == truncate_at_stop(full, stops), (text.text, full, stops)
        assert text.ready() == text.text
        before = tok.decode([t for t in text.tokens[:-1] if t != eos])
        if text.stopped:  # it ended at the token that completed a stop string
            stopped += 1
            assert truncate_at_stop(before, stops) == before
            kept = text.kept_tokens()
            assert len(tok.decode(kept)) >= len(text.text) and (not kept or len(tok.decode(kept[:-1])) < len(text.text))
            assert text.finish_reason == "stop"
        elif text.tokens[-1] == eos:
            assert text.finish_reason == "stop" and eos not in text.tokens[:-1]
        else:
            assert text.finish_reason == "length" and len(text.tokens) in (max_new, len(row))
            assert text.kept_tokens() == text.tokens
    assert stopped > 20


def test_a_token_costs_the_same_at_the_end_of_a_long_row(tok):
    """2,000 tokens with 16 stop strings that never occur, then one that does: the decoding work (tokens
    passed to the tokenizer) for the last 100 tokens is no more than 2x the first 100's."""
    ids = tok.encode((assets() / "text" / "tinyshakespeare.txt").read_text()[:40000])[:2000]
    stops = [f"<stop {i}>" for i in range(15)] + ["THE END"]
    counting = Counting(tok)
    text = RowText(counting, tok.eos_id, stops)
    work = []
    for t in ids:
        before = counting.decoded
        assert not text.append(t)
        work.append(counting.decoded - before)
    assert sum(work[-100:]) <= 2 * sum(work[:100]), (sum(work[:100]), sum(work[-100:]))
    assert text.text == tok.decode(ids)
    for t in tok.encode(" and so, THE END of it"):
        if text.append(t):
            break
    assert text.stopped and text.text == tok.decode(ids) + " and so, "
