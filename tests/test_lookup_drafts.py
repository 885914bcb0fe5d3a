"""Where Whisper's lookup drafts come from (`lookup_drafts`): the reference text laid out after the
prompt's last tokens, n-gram matches in the tokens so far, timestamps matched as one class and never
drafted, and no draft past the end of the reference. Token ids below are Whisper tiny.en's: specials
from 50256 (end of text), timestamps from 50363."""

from __future__ import annotations

from edgert.runtime.seq2seq_speculative import lookup_drafts

SOT, NO_TS, EOT, TS = 50257, 50362, 50256, 50363


def drafts(reference: list[int], context: list[int], k: int = 4, ngram: int = 3) -> tuple[list[int], int]:
    return lookup_drafts(reference, context, k, ngram, wildcard_from=TS, special_from=EOT)


def test_first_step_drafts_the_reference_after_the_prompt() -> None:
    # The decoder prompt [sot, no_timestamps] heads the earlier hypothesis "1 2 3 4 5".
    assert drafts([SOT, NO_TS, 1, 2, 3, 4, 5], [SOT, NO_TS]) == ([1, 2, 3, 4], 2)
    # Two tokens in, the reference's continuation follows the longest n-gram: "3 4 5".
    assert drafts([SOT, NO_TS, 1, 2, 3, 4, 5], [SOT, NO_TS, 1, 2]) == ([3, 4, 5], 3)
    assert drafts([SOT, NO_TS, 1, 2, 3, 4, 5], [SOT, NO_TS, 1, 2], k=2) == ([3, 4], 3)


def test_nothing_runs_past_the_reference_or_matches_across_it() -> None:
    # The reference ends where the context's n-gram matched: nothing to copy (the context follows it
    # in the corpus, but the join is no text).
    assert drafts([SOT, 1, 2, 3], [SOT, 1, 2, 3]) == ([], 3)
    # Nothing anywhere: no draft.
    assert drafts([], [SOT, 7, 8]) == ([], 0)


def test_timestamps_match_each_other_and_are_never_drafted() -> None:
    # "<|0.00|> 5 6 <|2.00|>" before; now "<|0.40|> 5" (another window's offset): 6 follows, the
    # timestamp after it is not drafted.
    assert drafts([TS, 5, 6, TS + 100, 9], [SOT, TS + 20, 5]) == ([6], 2)
    # A match whose next token is a timestamp drafts nothing (its value is unknowable), even where a
    # shorter n-gram would have had text after it.
    assert drafts([1, 2, 3, TS + 50, 2, 3, 8], [SOT, 1, 2, 3]) == ([], 3)
    # Specials (end of text, start of transcript) end a draft too.
    assert drafts([1, 2, 3, EOT, 4], [SOT, 2]) == ([3], 1)


def test_single_tokens_match_only_in_the_reference() -> None:
    # "9 5" in the tokens so far does not make 5 a draft after the next 9 ...
    assert drafts([], [SOT, 9, 5, 6, 9]) == ([], 0)
    # ... but the reference's "9 7" does.
    assert drafts([9, 7, 7], [SOT, 9, 5, 6, 9], k=2) == ([7, 7], 1)
    # Two tokens match in the tokens so far: "6 9" was followed by "4 1".
    assert drafts([], [SOT, 6, 9, 4, 1, 6, 9]) == ([4, 1, 6, 9], 2)


def test_the_longest_continuation_wins_then_the_latest() -> None:
    # "1 2" occurs twice in the reference; the first has 3 tokens after it before the end, the second 1.
    assert drafts([1, 2, 3, 4, 5, 1, 2, 6], [SOT, 1, 2], k=3) == ([3, 4, 5], 2)
    # Both continuations full length: the later one, from the tokens so far.
    assert drafts([1, 2, 3, 4], [SOT, 1, 2, 5, 6, 1, 2], k=2) == ([5, 6], 2)


def test_after_a_timestamp_only_the_reference_drafts_in_full() -> None:
    # A segment boundary ". <|t|> <|t|>" matched in the tokens so far: any sentence start follows one,
    # so the draft is its first token only ...
    context = [SOT, TS, 1, 2, 13, TS + 80, TS + 80, 1, 5, 13, TS + 150, TS + 150]
    assert drafts([], context) == ([1], 3)
    # ... while the reference, what the window hears again, drafts in full after its start timestamp.
    assert drafts([SOT, TS, 7, 8, 9, 10], [SOT, TS + 3]) == ([7, 8, 9, 10], 2)
    # Text after the boundary drafts in full again.
    assert drafts([], [*context, 1]) == ([5, 13], 3)
