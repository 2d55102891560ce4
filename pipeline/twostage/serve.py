"""The second stage at request time: a release's ranker applied to one user's candidates.

Applied after retrieval and before re-ranking (pipeline/serving/answers.py): the retrieved
list (the release's precomputed candidates or the index search) is the "model" source; the
co-occurrence and segment-popularity sources are computed here from the user's seen list
(newest first, so items posted since the release count) with one sparse row sum and one
table row; the features are the offline ones (pipeline/twostage/features.py) from the
release's statistics. All of it is a handful of vector operations over the user's few
hundred candidates, then the ranker's two small matrix products: no loop over items.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load as st_load

from pipeline.config.twostage import TwoStageConfig
from pipeline.twostage import candidates as cg
from pipeline.twostage import features as tf
from pipeline.twostage.ranker import Ranker


@dataclass(frozen=True)
class ServingTwoStage:
    config: TwoStageConfig
    ranker: Ranker
    stats: tf.Stats
    similarity: sp.csr_matrix  # items x items, the co-occurrence source's S
    segment_table: np.ndarray  # float32 [segments, items]
    segment_edges: np.ndarray  # log1p(distinct items) bucket edges

    @property
    def model_candidates(self) -> int:
        """How many retrieved items the model source contributes (retrieval must fetch this many)."""
        return self.config.sources.get("model", 0)

    def _dense(self, name: str, seen: np.ndarray, n_items: int) -> np.ndarray:
        cfg = self.config
        if name == "cooccurrence":
            recent = seen[: cfg.recent_items]
            weights = (cfg.recent_decay ** np.arange(len(recent))).astype(np.float32)
            return np.asarray(self.similarity[recent].T @ weights, dtype=np.float32).ravel()
        segment = np.searchsorted(self.segment_edges, np.log1p(len(seen)), side="right")
        return self.segment_table[segment].astype(np.float32, copy=True)

    def rank(
        self,
        user_row: int,
        seen: np.ndarray,
        rows: np.ndarray,
        scores: np.ndarray,
        banned: np.ndarray,
        allowed: np.ndarray | None,
        want: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best `want` item rows and their ranker scores for one release user.

        rows/scores: the retrieved list (best first, already filtered); banned: item rows the
        request may not get (seen and excluded); allowed: the request's filter mask."""
        n_items = len(self.stats.item)
        props: dict[str, cg.Proposals] = {}
        for name, n in self.config.sources.items():
            if name == "model":
                items = np.full((1, n), -1, dtype=np.int64)
                vals = np.full((1, n), np.nan, dtype=np.float32)
                m = min(n, len(rows))
                items[0, :m], vals[0, :m] = rows[:m], scores[:m]
                props[name] = cg.Proposals(items, vals)
                continue
            dense = self._dense(name, seen, n_items)
            if allowed is not None:
                dense[~allowed] = -np.inf
            dense[banned] = -np.inf
            props[name] = cg.top_n(dense[None, :], n, 0.0)
        cands = cg.merge(props, n_items)
        if not len(cands.item):
            return np.empty(0, np.int64), np.empty(0, np.float32)
        X = tf.matrix(cands, np.array([user_row], dtype=np.int64), self.stats)
        s = self.ranker.predict(X)
        order = np.lexsort((cands.item, -s))[:want]
        return cands.item[order].astype(np.int64), s[order].astype(np.float32)


def decode(files: dict[str, bytes | None], n_users: int, n_items: int, where: str) -> ServingTwoStage:
    """The second stage from a release's verified files; ValueError naming what disagrees."""
    missing = [n for n in ("ranker.safetensors", "twostage.safetensors", "twostage.json") if files.get(n) is None]
    if missing:
        raise ValueError(
            f"{where}: ranker.safetensors comes with twostage.safetensors and twostage.json; missing {missing}"
        )
    get: Callable[[str], bytes] = lambda n: files[n]  # type: ignore[assignment,return-value]  # noqa: E731
    meta = json.loads(get("twostage.json"))
    a = st_load(get("twostage.safetensors"))
    ranker = Ranker.from_bytes(get("ranker.safetensors"))
    sim = sp.csr_matrix(
        (a["similarity_data"], a["similarity_indices"], a["similarity_indptr"]), shape=(n_items, n_items)
    )
    stats = tf.Stats.from_arrays(a)
    if (
        len(stats.user) != n_users
        or len(stats.item) != n_items
        or a["segment_table"].shape[1] != n_items
        or ranker.feature_names != meta["features"]
    ):
        raise ValueError(f"{where}: the two-stage files disagree with the id maps or the ranker's features")
    return ServingTwoStage(
        TwoStageConfig.model_validate(meta["config"]), ranker, stats, sim, a["segment_table"], a["segment_edges"]
    )
