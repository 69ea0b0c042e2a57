"""Which domain a text reads like: the classifier behind the requests router and the judge of domain
control accuracy (`evaluation.suite`), trained only on real text of each domain."""
from __future__ import annotations

import os
import random
from pathlib import Path

from ..atomic import atomic_path
from ..errors import UserError


class DomainClassifier:
    """Which domain a text reads like: TF-IDF of word 1-2 grams and character 2-4 grams (within
    words), then logistic regression. The character features keep the judge working on the misspelt,
    half-formed words of small models' samples, where whole-word features alone miss."""

    FORMAT = 1  # bumped if the saved layout changes

    def __init__(self):
        self.pipeline = None
        self.domains: list[str] = []
        self.per_domain = 0  # training texts per domain after balancing

    @staticmethod
    def _build(seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import FeatureUnion, Pipeline
        features = FeatureUnion([
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=100_000)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2,
                                     max_features=100_000)),
        ])
        return Pipeline([("features", features),
                         ("logreg", LogisticRegression(C=10.0, max_iter=1000, random_state=seed))])

    def fit(self, texts_by_domain: dict[str, list[str]], max_per_domain: int | None = 5000,
            seed: int = 0) -> "DomainClassifier":
        """Train on real texts. Every domain is subsampled (deterministically, by `seed`) to the size of
        the smallest one, capped at `max_per_domain`, so no domain wins by sheer numbers."""
        if len(texts_by_domain) < 2:
            raise UserError(f"a domain classifier needs at least two domains, got {sorted(texts_by_domain)}")
        for name, texts in texts_by_domain.items():
            if not [t for t in texts if t.strip()]:
                raise UserError(f"domain '{name}' has no non-empty text to train the classifier on")
        pools = {name: [t for t in texts if t.strip()] for name, texts in sorted(texts_by_domain.items())}
        n = min(len(p) for p in pools.values())
        if max_per_domain:
            n = min(n, max_per_domain)
        rng = random.Random(seed)
        X, y = [], []
        for name, pool in pools.items():
            keep = sorted(rng.sample(range(len(pool)), n))
            X += [pool[i] for i in keep]
            y += [name] * n
        self.pipeline = self._build(seed).fit(X, y)
        self.domains = [str(c) for c in self.pipeline.classes_]
        self.per_domain = n
        return self

    def _require_fitted(self) -> None:
        if self.pipeline is None:
            raise UserError("the domain classifier is not trained; call fit() or load() first")

    def predict_proba(self, texts: list[str]) -> list[dict[str, float]]:
        self._require_fitted()
        if not texts:
            return []
        probs = self.pipeline.predict_proba(list(texts))
        return [{d: float(p) for d, p in zip(self.domains, row)} for row in probs]

    def predict(self, texts: list[str]) -> list[str]:
        return [max(p, key=p.get) for p in self.predict_proba(texts)]

    def accuracy(self, texts_by_domain: dict[str, list[str]]) -> dict[str, float]:
        """Per domain, the share of its texts classified as that domain."""
        self._require_fitted()
        out = {}
        for name, texts in texts_by_domain.items():
            if name not in self.domains:
                raise UserError(f"the classifier does not know domain '{name}' (it knows: {', '.join(self.domains)})")
            if not texts:
                raise UserError(f"no texts for domain '{name}' to measure accuracy on")
            out[name] = sum(p == name for p in self.predict(texts)) / len(texts)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """joblib file, written to a temp file beside `path` then renamed, so a crash never leaves half a file."""
        import joblib
        self._require_fitted()
        path = Path(path)
        with atomic_path(path) as tmp:
            joblib.dump({"format": self.FORMAT, "domains": self.domains, "per_domain": self.per_domain,
                         "pipeline": self.pipeline}, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DomainClassifier":
        """Only load files you trust: joblib files are pickles and can run code."""
        import joblib
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such classifier file (write one with DomainClassifier.save)")
        try:
            state = joblib.load(path)
        except Exception as e:  # pickle raises many types for truncated or foreign files
            raise UserError(f"{path}: not a readable classifier file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != cls.FORMAT or "pipeline" not in state:
            raise UserError(f"{path}: not a domain classifier file written by DomainClassifier.save")
        clf = cls()
        clf.pipeline, clf.domains = state["pipeline"], list(state["domains"])
        clf.per_domain = state.get("per_domain", 0)
        return clf
