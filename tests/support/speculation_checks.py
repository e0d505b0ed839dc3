"""The check that speculation with a bridge gives the one-token loop's output, shared by the
in-process tests (test_speculation_bridged.py) and the real-vLLM ones
(test_integration_tokenizers.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from proxyclient import Generation, ProxyClientError
from proxyclient.steps import OneTokenStep
from tests.support.reference_bridged import BridgedWorld, check_one_token_loop

UNSEEN = st.sampled_from(["residual", "restrict", "floor"])
UNTWINNED = st.sampled_from(["prefix", "drop"])
DRAFT_TOKENS = st.integers(1, 8)


def property_settings(max_examples: int) -> settings:
    """Reproducible examples (derandomized), no deadline: each one runs several generations."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


Row = tuple[tuple[int, ...], torch.Tensor, torch.Tensor]  # base top-k ids, expert, anti-expert


@contextlib.contextmanager
def observed_rows() -> Iterator[list[Row]]:
    """While open, the base's top-k ids and the proxies' rows of every position a step
    verifies (in the order of the positions: each one is verified exactly once)."""
    rows: list[Row] = []
    real = OneTokenStep.candidates

    def recording(self, config, observation, *, alpha=None):
        if alpha is None and observation.expert is not None:  # the tuned scores, not the base's
            rows.append((observation.top.token_ids, observation.expert, observation.anti))
        return real(self, config, observation, alpha=alpha)

    OneTokenStep.candidates = recording
    try:
        yield rows
    finally:
        OneTokenStep.candidates = real


def outcome(tuner, prompt: str, **options) -> Generation:
    """The generation, or the partial one a failure hands back (its ``error`` set)."""
    try:
        return tuner.generate(prompt, **options)
    except ProxyClientError as exc:
        assert exc.partial is not None
        return exc.partial


def assert_drafts_give_off_tokens(
    tuner, world: BridgedWorld, prompt: str, *, draft_tokens: int, mode: str = "base", **options
) -> None:
    """Greedy base drafts (``mode``: "base", or "stream" with ``draft_tokens`` per stream) give
    ``off``'s tokens, reading the proxies at the same positions with the same log-probs and
    counting the same candidates; ``off`` equals the bridged reference."""
    with observed_rows() as off_rows:
        off = outcome(tuner, prompt, speculate="off", **options)
    lengths = {"draft_tokens": draft_tokens, "stream_tokens": draft_tokens}
    with observed_rows() as draft_rows:
        got = outcome(tuner, prompt, speculate=mode, **lengths, **options)
    # A setting that leaves no candidate (say `drop` + `restrict` against proxies whose twins
    # are single characters) fails the same way, at the same token, in both.
    assert got.error == off.error
    assert got.token_ids == off.token_ids
    assert got.text == off.text and got.finish_reason == off.finish_reason
    # The proxies were read at the same positions: where each base token's bytes begin. (A
    # failing position is tried again by the next step: compare the positions before it.)
    if off.error is not None:
        draft_rows, off_rows = draft_rows[: len(off.token_ids)], off_rows[: len(off.token_ids)]
    assert len(draft_rows) == len(off_rows)
    for i, ((top, expert, anti), (off_top, off_expert, off_anti)) in enumerate(
        zip(draft_rows, off_rows, strict=True)
    ):
        assert top == off_top, f"position {i}: another base top-k"
        torch.testing.assert_close(expert, off_expert, atol=2e-5, rtol=0, msg=f"expert at {i}")
        torch.testing.assert_close(anti, off_anti, atol=2e-5, rtol=0, msg=f"anti at {i}")
    if off.error is not None:
        return
    for field in ("candidates", "untwinned_candidates", "dropped_candidates"):
        assert getattr(got.usage, field) == getattr(off.usage, field), field
    assert got.usage.requests <= off.usage.requests
    if options.get("unseen") != "floor":  # the reference's policies
        check_one_token_loop(
            tuner, world, prompt, n=options["max_new_tokens"], k=options["base_k"],
            alpha=options["alpha"], unseen=options["unseen"], untwinned=options["untwinned"],
        )  # fmt: skip
