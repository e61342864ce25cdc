"""Score labels: the label trie per tokenizer and exact label probabilities from logprobs."""

from __future__ import annotations

import math

import pytest

from curate.stages.score.labels import LABELS, LabelSet, RawOutput, most_probable


@pytest.fixture(scope="module")
def split_digits(tokenizer_dir):
    """The demo BPE tokenizer: every digit is a token, "10" is two tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def whole_ten():
    """A word-level tokenizer whose vocabulary has "10" as one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{str(i): i + 2 for i in range(11)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def _lp(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def test_split_digit_tokenizer_gives_a_two_level_trie(split_digits):
    ls = LabelSet(split_digits)
    digit = {d: split_digits.convert_tokens_to_ids(str(d)) for d in range(10)}
    assert set(ls.first) == set(digit.values())
    assert ls.next == {digit[1]: {ls.eos: "1", digit[0]: "10"}}
    assert ls.max_tokens == 2
    assert set(ls.logprob_token_ids) == set(digit.values()) | {ls.eos}


def test_exact_probabilities_when_the_path_goes_through_the_ambiguous_token(split_digits):
    ls = LabelSet(split_digits)
    d = {k: split_digits.convert_tokens_to_ids(str(k)) for k in range(10)}
    firsts = {d[k]: 0.05 for k in range(10)}
    firsts[d[1]] = 0.55
    raw = RawOutput("10", [d[1], d[0]], [_lp(firsts), _lp({d[0]: 0.8, ls.eos: 0.2})], 100, 90)
    assert ls.pending(raw) == []
    r = ls.read(raw)
    assert r.score == 10 and r.reason is None
    assert r.probs[10] == pytest.approx(0.55 * 0.8) and r.probs[1] == pytest.approx(0.55 * 0.2)
    assert sum(r.probs) == pytest.approx(1.0)
    expected = sum(s * p for s, p in enumerate(r.probs))
    assert r.expected == pytest.approx(expected)


def test_follow_up_resolves_the_ambiguous_token_off_the_path(split_digits):
    ls = LabelSet(split_digits)
    d = {k: split_digits.convert_tokens_to_ids(str(k)) for k in range(10)}
    # Unnormalised (raw) logprobs, plus a token outside the label set: both handled.
    firsts = {d[k]: 0.01 for k in range(10)} | {d[7]: 0.3, d[1]: 0.1, 999: 0.5}
    raw = RawOutput("7", [d[7], ls.eos], [_lp(firsts), _lp({ls.eos: 0.9, d[0]: 1e-9})])
    assert ls.pending(raw) == [d[1]]
    total = sum(v for k, v in firsts.items() if k != 999)
    r = ls.read(raw, {d[1]: _lp({d[0]: 0.25, ls.eos: 0.75})})
    assert r.score == 7
    assert r.probs[7] == pytest.approx(0.3 / total)
    assert r.probs[10] == pytest.approx(0.1 / total * 0.25)
    assert r.probs[1] == pytest.approx(0.1 / total * 0.75)
    assert sum(r.probs) == pytest.approx(1.0)
    # Without the follow-up the mass stays with the shorter label: still a distribution.
    fallback = ls.read(raw)
    assert fallback.probs[10] == 0 and sum(fallback.probs) == pytest.approx(1.0)


def test_a_probe_reads_every_label_from_one_output(split_digits):
    """A probe decodes through "1" by force (the output is not a label): its first step gives
    every first token's probability, its second P(10 | "1") and P(1 | "1"); no follow-up."""
    ls = LabelSet(split_digits)
    d = {k: split_digits.convert_tokens_to_ids(str(k)) for k in range(10)}
    assert ls.probe_token == d[1]
    firsts = {d[k]: 0.02 for k in range(10)} | {d[7]: 0.5, d[1]: 0.32, 999: 0.4}
    raw = RawOutput("11", [d[1], d[1]], [_lp(firsts), _lp({d[0]: 0.3, ls.eos: 0.6})], probe=True)
    assert ls.pending(raw) == []
    total = sum(v for k, v in firsts.items() if k != 999)
    r = ls.read(raw)
    assert r.score == 7 and r.reason is None
    assert r.probs[7] == pytest.approx(0.5 / total)
    assert r.probs[10] == pytest.approx(0.32 / total * 0.3 / 0.9)
    assert r.probs[1] == pytest.approx(0.32 / total * 0.6 / 0.9)
    assert sum(r.probs) == pytest.approx(1.0)
    broken = RawOutput("7", [d[7]], [_lp(firsts)], probe=True)  # not through "1": no reading
    assert ls.read(broken).score is None and "probe" in ls.read(broken).reason


def test_whole_ten_tokenizer_sums_both_spellings_of_ten(whole_ten):
    ls = LabelSet(whole_ten)
    ten, one, zero = (whole_ten.convert_tokens_to_ids(s) for s in ("10", "1", "0"))
    assert ls.first[ten] == "10" and ls.next[one] == {ls.eos: "1", zero: "10"}
    firsts = {whole_ten.convert_tokens_to_ids(str(k)): 0.05 for k in range(11)}
    firsts[ten], firsts[one] = 0.3, 0.2
    total = sum(firsts.values())
    raw = RawOutput("10", [ten], [_lp(firsts)])
    r = ls.read(raw, {one: _lp({zero: 0.5, ls.eos: 0.5})})
    assert r.probs[10] == pytest.approx((0.3 + 0.2 * 0.5) / total)
    assert r.probs[1] == pytest.approx(0.2 * 0.5 / total)


def test_invalid_outputs_have_a_reason_and_no_score(split_digits):
    ls = LabelSet(split_digits)
    bad = ls.read(RawOutput("Score: 7", []))
    assert bad.score is None and "not a score label" in bad.reason
    err = ls.read(RawOutput(error="server rejected the request (HTTP 400): too long"))
    assert err.score is None and err.reason.startswith("server rejected")
    assert ls.pending(RawOutput("maybe", [], [{}])) == []


def test_choice_without_logprobs_still_gives_the_score(split_digits):
    r = LabelSet(split_digits).read(RawOutput("8", []))
    assert (r.score, r.expected, r.probs, r.reason) == (8, None, None, None)


def test_labels_are_zero_to_ten():
    assert tuple(str(i) for i in range(11)) == LABELS


def test_stored_score_is_the_most_probable_label_not_the_greedy_choice(split_digits):
    """Greedy decoding under the constraint picks "1" when P(1) + P(10) is the largest first
    token, then "0": the issue's sample with P(10) = 0.086 and P(7) = 0.1365 came out as 10."""
    ls = LabelSet(split_digits)
    d = {k: split_digits.convert_tokens_to_ids(str(k)) for k in range(10)}
    firsts = {d[k]: 0.0955 for k in (0, 2, 3, 4, 5, 6, 8, 9)} | {d[7]: 0.1365, d[1]: 0.1}
    raw = RawOutput("10", [d[1], d[0]], [_lp(firsts), _lp({d[0]: 0.86, ls.eos: 0.14})])
    r = ls.read(raw)
    assert r.probs[10] == pytest.approx(0.086, abs=1e-3)
    assert r.score == 7 == max(range(11), key=lambda s: r.probs[s])
    assert r.expected == pytest.approx(sum(s * p for s, p in enumerate(r.probs)))


def test_most_probable_ties_go_to_the_lower_label():
    probs = [0.0] * 11
    probs[4] = probs[9] = 0.5
    assert most_probable(probs) == 4
