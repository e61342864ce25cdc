"""Score labels "0".."10": the constrained choice, and exact label probabilities from logprobs.

No free text is parsed. The engine decodes under a structured-output constraint that only
allows the strings "0".."10", so the generated text *is* the integer score (or the request is
invalid). The probability of each label is read from token logprobs, which must account for
tokenisation: Qwen2-style tokenizers split digits, so "10" is the two tokens "1" "0", and the
first token "1" carries the mass of both scores 1 and 10. The label set is a two-level trie:

- first tokens: every vocabulary token that spells a prefix of a label ("0".."9", and "10"
  when the vocabulary has it);
- for an ambiguous first token (here "1"), its continuations: "0" (-> 10) and end-of-sequence
  (-> 1).

P(label) = P(first) for unambiguous first tokens, and P(first) * P(continuation | first) for
the others, each level renormalised over the tokens the constraint allows, which is what the
constrained decoder sees. The conditional comes from the decoded path's second step when the
greedy path went through that first token, else from a follow-up request (the prompt plus that
token, one step, almost fully prefix-cached). The expected score sum(s * P(s)) is then exact
for any tokenizer whose labels are at most two tokens.

The stored score is the most probable label, not the constrained greedy output: greedy takes
the likeliest *first token*, so "1" wins when P(1) + P(10) is the largest and the output is
10 even when P(10) alone is small (P(10) = 0.086 beside P(7) = 0.137). Without logprobs the
output is all there is, and it is the score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from curate.core.errors import CurateError

LABELS = tuple(str(s) for s in range(11))
# A first token's mass below this is not worth a follow-up; it goes to its shortest label.
MIN_FOLLOW_UP_PROB = 1e-6


class LabelSetError(CurateError):
    """The tokenizer cannot express the labels as one or two tokens."""


@dataclass
class RawOutput:
    """What an engine returned for one request (both engines fill it the same way)."""

    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    steps: list[dict[int, float]] = field(default_factory=list)  # logprobs per generated step
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    error: str | None = None
    probe: bool = False  # decoded through the ambiguous first token by force, not a choice


@dataclass
class Reading:
    """One request's result: the score (the most probable label), the expected score, the
    label distribution, or why there is none."""

    score: int | None
    expected: float | None
    probs: list[float] | None  # P("0") .. P("10")
    reason: str | None = None  # set when score is None


def _token_for(tokenizer, text: str) -> int | None:
    """The vocabulary id that decodes to exactly ``text``, if there is one."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.decode([tid]) == text:
        return tid
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids) == text:
        return ids[0]
    return None


class LabelSet:
    """Token tables of the labels for one tokenizer."""

    def __init__(self, tokenizer, labels: tuple[str, ...] = LABELS) -> None:
        self.labels = labels
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise LabelSetError("the judge tokenizer has no eos_token_id")
        prefixes = sorted({lab[:i] for lab in labels for i in range(1, len(lab) + 1)})
        self.first: dict[int, str] = {}  # token id -> the label prefix it spells
        for p in prefixes:
            tid = _token_for(tokenizer, p)
            if tid is not None:
                self.first[tid] = p
        # Continuations of first tokens that do not end every label they start.
        self.next: dict[int, dict[int, str]] = {}
        for tid, p in self.first.items():
            longer = [lab for lab in labels if lab.startswith(p) and lab != p]
            if not longer:
                continue
            table = {self.eos: p} if p in labels else {}
            for lab in longer:
                cid = _token_for(tokenizer, lab[len(p) :])
                if cid is None:
                    raise LabelSetError(f"label {lab!r} needs more than two tokens")
                table[cid] = lab
            self.next[tid] = table
        spelled = {self.first[t] for t in self.first if self.first[t] in labels}
        spelled |= {lab for table in self.next.values() for lab in table.values()}
        missing = [lab for lab in labels if lab not in spelled]
        if missing:
            raise LabelSetError(f"labels {missing} cannot be spelled with this tokenizer")

    @property
    def probe_token(self) -> int | None:
        """The first token a probe decodes through (the one ambiguous first token, "1" when
        "10" is two tokens); None when there is none, or several (then the choice readout)."""
        return next(iter(self.next)) if len(self.next) == 1 else None

    @property
    def max_tokens(self) -> int:
        """Decode steps a label can take: one per character at most."""
        return max(len(lab) for lab in self.labels)

    @property
    def logprob_token_ids(self) -> list[int]:
        """Every token whose logprob the reading needs, at any step."""
        ids = set(self.first)
        for table in self.next.values():
            ids |= set(table)
        return sorted(ids)

    def first_probs(self, raw: RawOutput) -> dict[int, float] | None:
        if not raw.steps:
            return None
        return _normalise(raw.steps[0], self.first)

    def pending(self, raw: RawOutput) -> list[int]:
        """Ambiguous first tokens whose continuation this output does not give."""
        if raw.error is not None or raw.probe or raw.text not in self.labels:
            return []
        firsts = self.first_probs(raw)
        if firsts is None:
            return []
        on_path = raw.token_ids[0] if raw.token_ids and len(raw.steps) > 1 else None
        return [t for t in self.next if firsts.get(t, 0.0) > MIN_FOLLOW_UP_PROB and t != on_path]

    def read(
        self, raw: RawOutput, follow_ups: dict[int, dict[int, float]] | None = None
    ) -> Reading:
        """The score and label probabilities; ``follow_ups`` maps an ambiguous first token to
        the next-step logprobs of the prompt extended by it."""
        if raw.error is not None:
            return Reading(None, None, None, raw.error)
        if raw.probe:
            return self._read_probe(raw)
        if raw.text not in self.labels:
            return Reading(None, None, None, f"output {raw.text!r} is not a score label 0..10")
        score = int(raw.text)
        firsts = self.first_probs(raw)
        if firsts is None:  # the server returned no logprobs: the choice alone
            return Reading(score, None, None)
        on_path = raw.token_ids[0] if raw.token_ids and len(raw.steps) > 1 else None
        return self._distribution(raw, firsts, on_path, follow_ups)

    def _read_probe(self, raw: RawOutput) -> Reading:
        """A probe's reading: no label was chosen; both steps' logprobs give them all."""
        firsts = self.first_probs(raw)
        if firsts is None or len(raw.steps) < 2 or raw.token_ids[:1] != [self.probe_token]:
            return Reading(None, None, None, "the probe returned no label logprobs")
        return self._distribution(raw, firsts, self.probe_token, None)

    def _distribution(
        self,
        raw: RawOutput,
        firsts: dict[int, float],
        on_path: int | None,
        follow_ups: dict[int, dict[int, float]] | None,
    ) -> Reading:
        probs = dict.fromkeys(self.labels, 0.0)
        for tid, p in firsts.items():
            if tid not in self.next:
                probs[self.first[tid]] += p
                continue
            step = raw.steps[1] if tid == on_path else (follow_ups or {}).get(tid)
            cond = _normalise(step, self.next[tid]) if step else None
            if cond is None:  # negligible mass (no follow-up asked): the shortest label
                probs[min(self.next[tid].values(), key=len)] += p
                continue
            for cid, q in cond.items():
                probs[self.next[tid][cid]] += p * q
        values = [probs[lab] for lab in self.labels]
        expected = sum(int(lab) * v for lab, v in zip(self.labels, values, strict=True))
        return Reading(int(self.labels[most_probable(values)]), expected, values)


def most_probable(probs: list[float]) -> int:
    """The index of the most probable label (label s is index s for 0..10); a tie goes to
    the lower one."""
    return max(range(len(probs)), key=lambda s: (probs[s], -s))


def _normalise(logprobs: dict[int, float], allowed: dict[int, str]) -> dict[int, float] | None:
    """Probabilities of the allowed tokens, renormalised over them (what the constraint sees)."""
    lps = {
        t: lp for t, lp in logprobs.items() if t in allowed and lp is not None and lp > -math.inf
    }
    if not lps:
        return None
    top = max(lps.values())
    weights = {t: math.exp(lp - top) for t, lp in lps.items()}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}
