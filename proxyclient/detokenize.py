"""Token ids -> text pieces as they are chosen, with stop sequences.

Decoding a window rather than the whole output keeps each step O(1); the window starts a few prompt
tokens back so that tokenizers which drop a leading space at the start of a decode (SentencePiece)
produce the same text as a decode of the whole sequence. A piece ending in U+FFFD is an incomplete
UTF-8 character and waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_CONTEXT_TOKENS = 6


class TextAssembler:
    """Turns chosen token ids into text pieces that are safe to show: complete characters, and
    never the start of a stop sequence that may still complete."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
    ) -> None:
        """``decode``: ids -> text without special tokens, U+FFFD for incomplete characters."""
        self._decode_ids = decode
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._text = ""  # all text decoded so far (complete characters)
        self._shown = 0  # how much of _text has been handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """The output text so far, cut before a stop sequence if one matched."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became safe to show (maybe "")."""
        if self.stopped:
            raise RuntimeError("add() after a stop sequence matched")
        self._ids.append(token_id)
        self._text += self._decode_new()
        return self._release()

    def finish(self) -> str:
        """The rest, at the end of generation (incomplete characters as U+FFFD)."""
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._text += self._decode(self._ids[self._prefix_offset :])[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_ids(list(ids))

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _release(self, final: bool = False) -> str:
        if self._stop:
            longest = max(len(s) for s in self._stop)
            search_from = max(0, self._shown - longest + 1)
            hits = [i for s in self._stop if (i := self._text.find(s, search_from)) >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self.stopped = True
        end = len(self._text)
        if self._stop and not self.stopped and not final:
            end -= _held_back(self._text, self._stop)
        piece = self._text[self._shown : end]
        self._shown = end
        return piece


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
