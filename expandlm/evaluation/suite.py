"""Generation-quality metrics: structural validity, text health, domain control accuracy (docs/DESIGN.md,
"Metrics").

Structural validity is each domain's own check (`Domain.valid`, e.g. the recipe layout).

Domain control accuracy needs a held-out judge: `routing.classifier.DomainClassifier`, a TF-IDF +
logistic regression model trained only on real text of every domain (never on generated text, so a
model cannot "pass" by imitating its own mistakes).
"""
from __future__ import annotations

import re

from ..errors import UserError

# ---------------------------------------------------------------------------------------------------
# text health (every domain)

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits, with inner apostrophes kept ("don't", "Lily's"
    are one word each). Punctuation and whitespace separate words and are dropped, so "cat." and
    "cat," count as the same word."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def text_health(samples: list[tuple[str, bool]]) -> dict:
    """Health of generated text of any domain, given (text, finished) pairs (tokenised with `words`):

    - finished_share: share of samples that ended with end-of-text before the length limit.
    - distinct_2: distinct word bigrams / all word bigrams, pooled over samples (bigrams never span
      two samples). 1.0 means no bigram ever repeats; a looping model goes toward 0.
    - repeated_4gram_rate: share of word 4-grams that repeat an earlier 4-gram of the same sample,
      pooled over samples. 0.0 for text that never repeats itself.
    Both rates are 0.0 when the samples have no bigram (or 4-gram) at all.
    """
    if not samples:
        raise UserError("text_health needs at least one sample")
    bigrams: list[tuple[str, ...]] = []
    fourgrams = repeats = 0
    for text, _ in samples:
        tokens = words(text)
        bigrams += _ngrams(tokens, 2)
        seen: set[tuple[str, ...]] = set()
        for gram in _ngrams(tokens, 4):
            repeats += gram in seen
            seen.add(gram)
            fourgrams += 1
    return {
        "finished_share": sum(bool(f) for _, f in samples) / len(samples),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "repeated_4gram_rate": repeats / fourgrams if fourgrams else 0.0,
        "samples": len(samples),
    }


def validity(domain, samples: list[tuple[str, bool]]) -> float | None:
    """Share of (text, finished) samples that pass the domain's structural check (None: no check)."""
    if domain.check is None:
        return None
    return sum(domain.valid(text, finished) for text, finished in samples) / len(samples)


def validity_ceiling(domain, documents: list[str], tokenizer, context: int) -> float | None:
    """Structural validity of real documents, each counted as ended only if it fits the model's context
    with the model's tokenizer (request prefix and <|eos|> included): the most a perfect model could
    score at this context length."""
    from ..data.tokenizer import encode_texts

    fits = [len(ids) + 3 <= context for ids in encode_texts(tokenizer, documents)]
    return validity(domain, list(zip(documents, fits)))


def domain_control_accuracy(classifier, samples_by_domain: dict[str, list[str]]) -> dict[str, float]:
    """For each requested domain d, the share of the samples generated for d that the classifier (a
    `routing.classifier.DomainClassifier`) assigns to d (docs/DESIGN.md, "Metrics")."""
    return classifier.accuracy(samples_by_domain)
