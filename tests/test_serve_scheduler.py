"""The serving scheduler's parts that need no model: stop strings found in a growing text in linear time,
and a token's logprobs. (The scheduler itself runs under a live server in test_serve_app.py.)"""
import random

import pytest
import torch

from expandlm.serve.scheduler import StopStrings, token_logprob


def test_stop_strings_are_found_and_held_back_as_before():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text, matcher = "", StopStrings(stops)
        while True:
            new = "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
            cut, text = matcher.feed(new), text + new
            found = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
            assert cut == found, (stops, text)
            if cut is not None or len(text) > 40:
                break
            hold = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
            assert matcher.hold == hold, (stops, text)


class Counted(str):
    """A stop string that counts how often a character of it is read."""
    reads = 0

    def __getitem__(self, i):
        Counted.reads += 1
        return str.__getitem__(self, i)


def test_matching_reads_each_stop_a_bounded_number_of_times_per_character():
    # the worst case of the check it replaced: long stops that the text almost completes at every token
    stops, fed = [Counted("a" * 256) for _ in range(4)], 0
    matcher = StopStrings(stops)
    Counted.reads = 0
    for _ in range(2000):
        assert matcher.feed("aaab") is None
        fed += 4
    # Knuth-Morris-Pratt: at most two steps of the failure table a character, amortised; O(L) a token was 256
    assert Counted.reads <= 3 * fed * len(stops)


def test_a_tokens_logprob_is_the_raw_distributions_with_its_likeliest_alternatives():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0])
    expected = torch.log_softmax(logits, -1)
    entry = token_logprob(logits, 3, 2)
    assert entry.token == 3 and entry.logprob == pytest.approx(float(expected[3]))
    assert [t for t, _ in entry.top] == [1, 3] and entry.top[0][1] == pytest.approx(float(expected[1]))
    assert token_logprob(logits, 0, 0).top == ()
