"""StopHolder: text held back while it may begin a stop string, released a whole token at a time."""

from stoker.workers.backend import Chunk
from stoker.workers.stops import StopHolder


def push_all(holder: StopHolder, tokens: list[str]):
    chunks, hit = [], False
    for tok in tokens:
        out, hit = holder.push(tok)
        chunks += out
        if hit:
            break
    return chunks, hit


def test_text_that_may_begin_a_stop_is_held_until_it_does_not():
    h = StopHolder(["END"])
    assert h.push(" a") == ([Chunk(" a", 1)], False)
    assert h.push(" E") == ([], False)  # " E" may begin "END"
    assert h.push("x") == ([Chunk(" Ex", 2)], False)  # it did not: both tokens go, as one chunk
    assert h.sent_tokens == 3


def test_a_stop_string_over_several_tokens_ends_the_text_before_it():
    h = StopHolder(["\n\n"])
    chunks, hit = push_all(h, [" one", " two\n", "\nthree"])
    assert hit and "".join(c.text for c in chunks) == " one two"
    assert sum(c.n for c in chunks) == h.sent_tokens == 2  # the stop's last token carries nothing


def test_without_stops_every_token_goes_at_once_and_empty_pieces_count():
    h = StopHolder([])
    chunks, _ = push_all(h, ["a", "", "b"])
    assert [(c.text, c.n) for c in chunks] == [("a", 1), ("", 1), ("b", 1)]
    assert h.finish() == [] and h.sent_tokens == 3


def test_at_the_end_what_was_held_back_goes_and_counts():
    h = StopHolder(["END"])
    h.push(" a")
    assert h.push(" EN") == ([], False)
    assert h.finish() == [Chunk(" EN", 1)] and h.sent_tokens == 2
    assert h.finish() == [] and h.sent_tokens == 2


def test_the_first_stop_string_in_the_text_is_where_it_ends():
    h = StopHolder(["X"])
    chunks, hit = h.push("aXbX")
    assert hit and chunks == [Chunk("a", 1)]
    h = StopHolder(["zz", "b"])
    chunks, hit = push_all(h, ["a", "b zz"])
    assert hit and "".join(c.text for c in chunks) == "a"


def test_counts_and_offsets_over_several_held_tokens():
    h = StopHolder(["STOP"])
    assert h.push("S") == ([], False)  # a text no longer than the stop string, all of it a prefix
    assert h.push("T") == ([], False)
    assert h.finish() == [Chunk("ST", 2)]  # two tokens, one chunk
    h = StopHolder(["c!"])
    chunks, hit = push_all(h, ["ab", "c", "de", "c!"])
    assert hit and chunks == [Chunk("ab", 1), Chunk("cde", 2)]  # "c" held until "de" showed it was no stop
    assert h.sent_tokens == 3
    h = StopHolder(["xyz"])
    chunks, hit = push_all(h, ["a", "b", "x", "y", "xyz"])
    assert hit and chunks == [Chunk("a", 1), Chunk("b", 1), Chunk("xy", 2)] and h.sent_tokens == 4
