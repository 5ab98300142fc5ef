"""Minimal stoker client written from protocol/README.md alone (no stoker imports).

Uses only pyzmq, msgpack and the standard library. It sends one `generate` (or `ping`)
request on a DEALER socket, streams the tokens to stdout and checks the protocol's
guarantees as it goes.

Exit codes: 0 ok, 3 `error` reply, 4 timeout, 5 protocol violation.
"""
import argparse
import json
import os
import sys

import msgpack
import zmq

REQ_ID = "raw-1"
DRAIN_S = 0.3  # after the terminal reply, listen briefly for stray replies with our id


def default_endpoint() -> str:
    if os.environ.get("STOKER_ENDPOINT"):
        return os.environ["STOKER_ENDPOINT"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return f"ipc://{os.environ['XDG_RUNTIME_DIR']}/stoker/stoker.sock"
    return f"ipc:///tmp/stoker-{os.getuid()}/stoker.sock"


def violation(msg: str) -> None:
    print(f"PROTOCOL VIOLATION: {msg}", file=sys.stderr)
    sys.exit(5)


def is_int(x) -> bool:
    return type(x) is int


def is_num(x) -> bool:
    return type(x) in (int, float)


def recv(sock: zmq.Socket, timeout_s: float):
    """Next reply as a dict, or None on timeout."""
    if not sock.poll(int(timeout_s * 1000)):
        return None
    frames = sock.recv_multipart()
    if len(frames) != 1:
        violation(f"reply has {len(frames)} frames, expected exactly 1")
    try:
        msg = msgpack.unpackb(frames[0], raw=False)
    except Exception as e:  # noqa: BLE001
        violation(f"reply is not valid msgpack: {e}")
    if not isinstance(msg, dict) or not all(isinstance(k, str) for k in msg):
        violation(f"reply is not a map with string keys: {msg!r}")
    if msg.get("v") != 1:
        violation(f"reply has v={msg.get('v')!r}, expected 1")
    return msg


def check_end(msg: dict) -> None:
    if msg.get("reason") not in ("stop", "length", "cancelled"):
        violation(f"end has reason {msg.get('reason')!r}")
    usage, timings = msg.get("usage"), msg.get("timings")
    if not isinstance(usage, dict) or not all(is_int(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")):
        violation(f"end.usage malformed: {usage!r}")
    if not isinstance(timings, dict) or not all(
            is_num(timings.get(k)) for k in ("queued_ms", "load_ms", "ttft_ms", "total_ms")):
        violation(f"end.timings malformed: {timings!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=None, help="default: as in README section 1")
    p.add_argument("--model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--messages-json", help='e.g. [{"role": "user", "content": "hi"}]')
    g.add_argument("--ping", action="store_true")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()

    if a.ping:
        req = {"v": 1, "op": "ping", "id": REQ_ID}
    else:
        req = {"v": 1, "op": "generate", "id": REQ_ID}
        for key, val in (("prompt", a.prompt), ("messages", a.messages_json and json.loads(a.messages_json)),
                         ("model", a.model), ("max_tokens", a.max_tokens),
                         ("seed", a.seed), ("temperature", a.temperature)):
            if val is not None:
                req[key] = val

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.endpoint or default_endpoint())
    sock.send(msgpack.packb(req, use_bin_type=True))

    next_seq, frames, tokens, terminal = 0, 0, 0, None
    while terminal is None:
        msg = recv(sock, a.timeout)
        if msg is None:
            print("TIMEOUT", file=sys.stderr)
            return 4
        ev, rid = msg.get("ev"), msg.get("id")
        # A request rejected before its id could be read gets id = null (README 2/5).
        if rid != REQ_ID and not (ev == "error" and rid is None):
            violation(f"reply for unknown id {rid!r}: {msg!r}")
        if ev == "error":
            print(f"ERROR {msg.get('code')}: {msg.get('message')}", file=sys.stderr)
            return 3
        if ev == "token":
            seq, n, text = msg.get("seq"), msg.get("n"), msg.get("text")
            if not (is_int(seq) and is_int(n) and n >= 1 and isinstance(text, str)):
                violation(f"malformed token: {msg!r}")
            if seq != next_seq:
                violation(f"token seq {seq}, expected {next_seq}")
            next_seq, frames, tokens = seq + n, frames + 1, tokens + n
            sys.stdout.write(text)
            sys.stdout.flush()
        elif ev == "end":
            if a.ping:
                violation("ping answered with end")
            check_end(msg)
            terminal = msg
        elif ev == "result":
            if not a.ping:
                violation("generate answered with result")
            if not isinstance(msg.get("data"), dict):
                violation(f"result.data is not a map: {msg!r}")
            terminal = msg
        # `info` and unknown ev values are ignored (forward compatibility).

    extra = recv(sock, DRAIN_S)
    if extra is not None and extra.get("id") == REQ_ID:
        violation(f"reply after terminal reply: {extra!r}")
    sock.close()

    if a.ping:
        print(json.dumps(terminal["data"]))
        return 0
    print(flush=True)
    if a.check:
        print(json.dumps({"reason": terminal["reason"], "usage": terminal["usage"],
                          "frames": frames, "tokens": tokens}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
