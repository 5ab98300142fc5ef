from stoker.protocol import messages as m
from stoker.protocol.codec import decode
from stoker.protocol.messages import InfoState, Reason
from stoker.supervisor.outbox import Outbox

USAGE = {"prompt_tokens": 1, "completion_tokens": 3}
TIMINGS = {"queued_ms": 0, "load_ms": 0, "ttft_ms": 0, "total_ms": 0}


def drain(box):
    sent = []
    assert box.flush(lambda frame: sent.append(decode(frame)) or True)
    assert box.size == 0  # everything it counted has gone out
    return sent


def test_tokens_of_one_request_merge_while_waiting():
    box = Outbox()
    box.add(m.info("a", InfoState.RUNNING))
    for i, t in enumerate(["x", "y", "z"]):
        box.add(m.token("a", i, 1, t))
    box.add(m.end("a", Reason.LENGTH, USAGE, TIMINGS))
    sent = drain(box)
    assert [s["ev"] for s in sent] == ["info", "token", "end"]
    assert (sent[1]["seq"], sent[1]["n"], sent[1]["text"]) == (0, 3, "xyz")


def test_interleaved_requests_keep_their_own_order():
    box = Outbox()
    box.add(m.token("a", 0, 1, "a0"))
    box.add(m.token("b", 0, 1, "b0"))
    box.add(m.token("a", 1, 2, "a1"))
    box.add(m.end("b", Reason.STOP, USAGE, TIMINGS))
    sent = drain(box)
    by_id = {}
    for s in sent:
        by_id.setdefault(s["id"], []).append(s)
    assert [(s["ev"], s.get("text")) for s in by_id["a"]] == [("token", "a0a1")]
    assert by_id["a"][0]["n"] == 3
    assert [s["ev"] for s in by_id["b"]] == ["token", "end"]


def test_nothing_merges_into_a_frame_already_sent():
    box = Outbox()
    box.add(m.token("a", 0, 1, "p"))
    box.add(m.token("b", 0, 1, "q"))
    sent = []
    # The pipe takes one frame, then is full.
    assert not box.flush(lambda frame: (len(sent) < 1) and (sent.append(decode(frame)) or True))
    box.add(m.token("a", 1, 1, "r"))
    sent += drain(box)
    assert [(s["id"], s["seq"], s["n"], s["text"]) for s in sent] == [("a", 0, 1, "p"), ("b", 0, 1, "q"), ("a", 1, 1, "r")]


def test_full_pipe_keeps_everything_in_order():
    box = Outbox()
    msgs = [m.token("a", i, 1, str(i)) for i in range(3)] + [m.end("a", Reason.STOP, USAGE, TIMINGS)]
    for msg in msgs:
        box.add(msg)
    assert not box.flush(lambda msg: False)
    assert len(box) == 2  # one merged token frame + end
    assert drain(box)[0]["text"] == "012"


def test_size_counts_what_waits_merged_or_not():
    box = Outbox()
    box.add(m.info("a", InfoState.RUNNING))
    after_info = box.size
    assert after_info > 0
    box.add(m.token("a", 0, 1, "x" * 1000))
    box.add(m.token("a", 1, 1, "y" * 1000))
    assert len(box) == 2 and box.size >= after_info + 2000
    assert not box.flush(lambda frame: False)
    drain(box)
