"""Constrained output for the llama backend: a request's `response_format` or `grammar` as GBNF
text llama.cpp's grammar sampler takes, checked before anything is generated.

A JSON schema becomes GBNF through llama-cpp-python's converter (the one llama.cpp ships as
json_schema_to_grammar.py); `json_object` is llama.cpp's JSON grammar. GBNF that does not parse
makes llama_sampler_init_grammar return NULL (and log why): that is a bad request, with llama's
reason, never a NULL sampler in a chain (which would crash the worker). Each grammar text is
parsed once per worker: `Grammars` remembers the ones that parsed, by content.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

from stoker.protocol.errors import BadRequest
from stoker.protocol.messages import Key

ROOT = b"root"
_REMEMBERED = 64  # grammar texts kept per worker (a batch job uses one or a few)


def wanted(sampling: Mapping[str, Any]) -> bool:
    """Whether the request's text is constrained."""
    return Key.RESPONSE_FORMAT in sampling or Key.GRAMMAR in sampling


class Grammars:
    """The GBNF text of each request's constraint, parsed by llama.cpp once per distinct text."""

    def __init__(self, vocab: Any) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.vocab = vocab
        self._texts: OrderedDict[str, str] = OrderedDict()  # the request's constraint -> GBNF

    def gbnf(self, sampling: Mapping[str, Any]) -> str | None:
        """The request's constraint as GBNF that llama.cpp parses; None if it has none. Raises
        BadRequest for a schema that does not convert or GBNF that does not parse."""
        if not wanted(sampling):
            return None
        # Not sort_keys: the order of a schema's properties is the order the text gives them in.
        key = json.dumps([sampling.get(Key.RESPONSE_FORMAT), sampling.get(Key.GRAMMAR)])
        text = self._texts.get(key)
        if text is None:
            text = self._convert(sampling)
            self._check(text)
            self._texts[key] = text
            if len(self._texts) > _REMEMBERED:
                self._texts.popitem(last=False)
        self._texts.move_to_end(key)
        return text

    @staticmethod
    def _convert(sampling: Mapping[str, Any]) -> str:
        if Key.GRAMMAR in sampling:
            return str(sampling[Key.GRAMMAR])
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        fmt = sampling[Key.RESPONSE_FORMAT]
        if fmt[Key.TYPE] == "json_object":
            return JSON_GBNF
        try:
            return json_schema_to_gbnf(json.dumps(fmt[Key.SCHEMA]))
        except Exception as exc:  # the converter raises what it meets: KeyError, ValueError, ...
            raise BadRequest(f"'response_format' schema cannot be turned into a grammar: "
                             f"{type(exc).__name__}: {exc}") from None

    def _check(self, text: str) -> None:
        """Raise BadRequest, with llama.cpp's reason, unless `text` parses."""
        # llama.cpp's grammar parser says why it failed on the process's stderr (fprintf).
        with _stderr_captured() as said:
            sampler = self._llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), ROOT)
        if not sampler:
            reason = " ".join(said().split()) or "llama.cpp could not parse it"
            raise BadRequest(f"the grammar does not parse: {reason[:500]}")
        self._llama_cpp.llama_sampler_free(sampler)

    def sampler(self, text: str, resumed: list[int]) -> Any:
        """A llama grammar sampler for `text` (from gbnf()), moved over `resumed` (the tokens a
        lost worker streamed already); the caller frees it, or a chain that holds it. Raises
        BadRequest, holding nothing, if the resumed text leaves the grammar."""
        llama_cpp = self._llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode("utf-8"), ROOT)
        if not sampler:  # it parsed when gbnf() checked it
            raise RuntimeError("llama.cpp could not make a grammar sampler for a grammar that parsed")
        if not advance(sampler, resumed):
            llama_cpp.llama_sampler_free(sampler)
            raise BadRequest("'resume' text does not fit the request's grammar; "
                             "it cannot be continued")
        return sampler


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """What is written to file descriptor 2 meanwhile (and then to the real stderr too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        text = ""
        try:
            yield lambda: text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            sys.stderr.write(text)


def allowed(grammar: Any, token: int) -> bool:
    """Whether the grammar sampler, in its state now, takes `token` next (one candidate checked:
    checking all 262,144 of Gemma's costs about 25 ms a token on 2 cores)."""
    import ctypes

    import llama_cpp

    one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    cur = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
    return one[0].logit != float("-inf")


def advance(grammar: Any, tokens: list[int]) -> bool:
    """Move the grammar over text already generated (a resumed request's); False, and the
    grammar left part-way, if the text leaves the grammar (llama.cpp aborts the process when a
    grammar accepts a token it does not allow, so each is checked first)."""
    import llama_cpp

    for token in tokens:
        if not allowed(grammar, token):
            return False
        llama_cpp.llama_sampler_accept(grammar, token)
    return True
