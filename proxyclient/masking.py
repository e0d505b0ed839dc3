"""A constraint's grammar run over the base's tokens: which base ids may come next.

The grammar runs over the tokens the base is conditioned on (for a bridged base, the base
tokenizer's vocabulary, in bytes), so a constrained generation is text the base itself could
have produced under the same mask. ``GrammarState`` follows one generation: it is asked for the
mask after a list of generated base ids and moves its matcher there (consuming, or rolling back
what a speculative draft appended and the step took back), so it needs no hook in the Sequence.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence as Ids
from typing import Any

import torch

from proxyclient.constraints import Constraint, compiled
from proxyclient.vocab import ByteVocab

_TOKENIZERS: dict[tuple[int, tuple[int, ...]], tuple[ByteVocab, Any]] = {}
_LOCK = threading.Lock()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every id's bytes (special tokens as 0xFF and
    a name, its convention), EOS and BOS, and a way to tokenize bytes.

    Tokenizing is the base tokenizer's (llguidance keeps forced text, such as a schema's keys, in
    its canonical tokens), where that spells exactly the bytes asked: a SentencePiece tokenizer
    puts a space before the text it encodes ("{" -> "▁{"), which llguidance would take for the
    grammar's forced bytes, so there a longest match over the vocabulary's bytes stands in.
    """

    def __init__(self, vocab: ByteVocab, eos: list[int], encode: Any) -> None:
        self.tokens = [
            data if data is not None else b"\xff[special_%d]" % i
            for i, data in enumerate(vocab.token_bytes)
        ]
        self.special_token_ids = sorted(
            i for i, data in enumerate(vocab.token_bytes) if data is None
        )
        self.eos_token_id = eos[0]
        self.bos_token_id = None
        self._vocab = vocab
        self._encode = encode
        self._longest = max((len(d) for d in vocab.token_bytes if d), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        with contextlib.suppress(UnicodeDecodeError):
            ids = list(self._encode(data.decode()))
            if self._vocab.bytes_of(ids) == data:
                return ids
        ids, at = [], 0
        while at < len(data):
            for end in range(min(len(data), at + self._longest), at, -1):
                token = self._vocab.id_of(data[at:end])
                if token is not None:
                    ids.append(token)
                    at = end
                    break
            else:
                at += 1  # a byte no token spells: nothing can produce it
        return ids


def grammar_tokenizer(vocab: ByteVocab, eos_ids: frozenset[int], encode: Any) -> Any:
    """llguidance's tokenizer for ``vocab`` (built once per vocabulary: a few ms to a second);
    ``encode``: text -> the base tokenizer's ids, without special tokens."""
    from llguidance import LLTokenizer, TokenizerWrapper

    eos = sorted(eos_ids) or [len(vocab)]  # a base with no EOS: an id no token has
    key = (id(vocab), tuple(eos))
    with _LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is not None and cached[0] is vocab:
            return cached[1]
        wrapper = TokenizerWrapper(_Vocabulary(vocab, eos, encode))
        tokenizer = LLTokenizer(wrapper, n_vocab=max(len(vocab), eos[-1] + 1), eos_token=eos)
        if len(_TOKENIZERS) >= 8:
            del _TOKENIZERS[next(iter(_TOKENIZERS))]
        _TOKENIZERS[key] = (vocab, tokenizer)
        return tokenizer


class GrammarState:
    """One generation's position in its constraint's grammar.

    ``allowed(generated)``: [size] bool, the base ids the grammar allows after the generated
    base ids ``generated`` (EOS among them once the text may end). ``finished(generated)``:
    nothing but EOS may follow.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any, size: int) -> None:
        from llguidance import LLMatcher

        self.constraint = constraint
        self._matcher = LLMatcher(tokenizer, compiled(constraint), log_level=0)
        self._size = size
        self._consumed: list[int] = []
        self._mask: torch.Tensor | None = None  # for ``_consumed``

    def allowed(self, generated: Ids[int]) -> torch.Tensor:
        self._move_to(generated)
        if self._mask is None:
            bias = torch.frombuffer(
                bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8
            )
            mask = torch.zeros(self._size, dtype=torch.bool)
            n = min(self._size, bias.numel())
            mask[:n] = bias[:n] > 0
            self._mask = mask
        return self._mask

    def finished(self, generated: Ids[int]) -> bool:
        self._move_to(generated)
        return self._matcher.is_stopped()

    def _move_to(self, generated: Ids[int]) -> None:
        consumed = self._consumed
        same = 0
        for a, b in zip(consumed, generated, strict=False):
            if a != b:
                break
            same += 1
        if same == len(consumed) == len(generated):
            return
        if same < len(consumed):
            self._matcher.rollback(len(consumed) - same)
            del consumed[same:]
        rest = list(generated[same:])
        if rest and not self._matcher.consume_tokens(rest):
            raise RuntimeError(
                f"{self.constraint.describe()}: tokens {rest} were generated although it does "
                f"not allow them: {self._matcher.get_error()}"
            )
        consumed += rest
        self._mask = None
