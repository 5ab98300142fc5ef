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
