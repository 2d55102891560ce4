"""Model configurations: one pydantic class per model kind, a union discriminated on `kind`.

Kept apart from the model code so that validating a tenant file (DAG parsing, the API)
never imports torch. Every class may carry `search`: ranges for the per-tenant Optuna
search (see `SelectionConfig` in tenant.py).

To add a kind: a class here (with `kind: Literal["..."]`), appended to MODEL_CONFIGS, and
its model class in pipeline/models/registry.py (which also says how the kind scores and
whether serving can fold a user in).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchRange(_Strict):
    """A numeric range to search: floats, or ints when `int` is true; `log` for scale parameters."""

    low: float
    high: float
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SearchRange:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


SearchSpace = SearchRange | list[Any]  # a range, or a list of choices


class ModelBase(_Strict):
    """What every model config has: a seed and optional search ranges over its own fields."""

    kind: str  # each subclass narrows it to a Literal: the tag of the ModelConfig union
    seed: int = 42
    search: dict[str, SearchSpace] = Field(
        default={}, description="Parameter -> range or choices, searched on a validation split (selection)."
    )

    @model_validator(mode="after")
    def _search_names_fields(self) -> ModelBase:
        unknown = sorted(set(self.search) - (set(type(self).model_fields) - {"kind", "search", "seed"}))
        if unknown:
            raise ValueError(f"search names unknown parameter(s) {unknown} of model kind {self.kind!r}")
        return self

    def fixed(self) -> ModelBase:
        """This config without its search ranges (what a trial or the chosen model runs)."""
        return self.model_copy(update={"search": {}})


class ALSConfig(ModelBase):
    """Implicit ALS with recency-graded targets, ALS-WR regularisation and a recency fold-in.

    Defaults were tuned on MovieLens-100K (per-user temporal 80/20 split) against a
    validation split carved from the training events; see pipeline/models/als.py.
    """

    kind: Literal["als"] = "als"
    factors: int = Field(default=64, ge=1, le=1024)
    iterations: int = Field(default=10, ge=1, le=200)
    regularization: float = Field(default=0.1, ge=0, description="lambda; scaled by n ** reg_exponent per row.")
    reg_exponent: float = Field(default=1.0, ge=0, le=2, description="1 = ALS-WR (lambda * n_u), 0 = plain lambda.")
    alpha: float = Field(default=1.0, ge=0, description="Confidence = 1 + alpha * log2(1 + events of the pair).")
    recency_half_life: float | None = Field(
        default=50.0, gt=0, description="Target halves per this many newer events of the user (None: all 1)."
    )
    recency_floor: float = Field(default=0.1, ge=0, le=1)
    fold_in_half_life: float | None = Field(
        default=5.0, gt=0, description="After training, re-solve users with this sharper recency (None: skip)."
    )
    fold_in_floor: float = Field(default=0.05, ge=0, le=1)
    fold_in_regularization: float = Field(default=0.3, ge=0)
    solver: Literal["cg", "cholesky"] = Field(
        default="cg", description="cg: a few warm-started conjugate-gradient steps per row; cholesky: exact solves."
    )
    cg_steps: int = Field(default=3, ge=1, le=64, description="CG steps per row and half-iteration.")
    fold_in_cg_steps: int = Field(default=5, ge=1, le=64, description="CG steps of the final user re-solve.")
    init_std: float = Field(default=0.1, gt=0, description="Initial factors ~ N(0, (init_std / sqrt(factors))^2).")
    cold_item_regularization: float | None = Field(
        default=10.0,
        gt=0,
        description="Items without events get vectors from their catalog attributes by a ridge map fitted on the "
        "warm items with this lambda (pipeline/models/attribute_map.py); None: they stay at 0.",
    )


class BPRConfig(ModelBase):
    """Bayesian Personalised Ranking (Rendle et al. 2009): SGD over sampled triples.

    Pair by pair on the CPU (compiled loop), mini-batches of `batch_size` on CUDA.

    Defaults were tuned on MovieLens-100K against a validation split carved from the training
    events (never the holdout): dynamic negative sampling (5 candidates) and a recency weight
    (half-life 10 pairs) took validation NDCG@10 from 0.107 (plain BPR) to 0.152; see
    pipeline/models/bpr.py.
    """

    kind: Literal["bpr"] = "bpr"
    factors: int = Field(default=64, ge=1, le=1024)
    epochs: int = Field(default=60, ge=1, le=2000)
    learning_rate: float = Field(default=0.03, gt=0)
    regularization: float = Field(default=0.02, ge=0, description="L2 on the rows a triple touches.")
    batch_size: int = Field(
        default=8192, ge=1, description="Positive pairs per step on CUDA; the CPU loop updates pair by pair."
    )
    negatives: int = Field(
        default=5, ge=1, le=64, description="Uniform negative candidates per positive; the highest scored is used."
    )
    optimizer: Literal["sgd", "adagrad"] = Field(default="adagrad", description="adagrad: one accumulator per row.")
    item_bias: bool = True
    recency_half_life: float | None = Field(
        default=10.0,
        gt=0,
        description="Weight of a positive halves per this many newer pairs of the user (None: all 1).",
    )
    recency_floor: float = Field(default=0.02, ge=0, le=1)
    init_std: float = Field(default=0.1, gt=0, description="Initial factors ~ N(0, (init_std / sqrt(factors))^2).")
    threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="CPU threads of the training loop. 1 is reproducible; more run Hogwild (lock-free shared "
        "updates): faster, but results vary from run to run.",
    )


class EASEConfig(ModelBase):
    """EASE (Steck 2019): a closed-form item-item model, score(u) = X[u] @ B (pipeline/models/ease.py).

    The solve is dense (n_items^2 memory, n_items^3 time): a kind for catalogs up to some
    tens of thousands of items. B is pruned to each item's `neighbours` largest |weights|
    right after the solve, so the model evaluated and gated is the one that is served:
    a sparse matrix a server can hold and sum rows of, not a dense n^2 one. On MovieLens-100K
    200 per row costs ~1% NDCG@10 against dense (benchmarks/quality.py prints both rows).
    `seed` is unused: the solve is exact.
    """

    kind: Literal["ease"] = "ease"
    regularization: float = Field(default=200.0, gt=0, description="lambda added to the diagonal of X^T X.")
    neighbours: int | None = Field(
        default=200, ge=1, description="Largest |weights| kept per item row of B (None: all, dense; small catalogs)."
    )


class ItemKNNConfig(ModelBase):
    """Cosine item-kNN (pipeline/models/itemknn.py): score(u) = X[u] @ S, S the top-k cosine
    neighbours of each item. `seed` is unused: the model is deterministic."""

    kind: Literal["item_knn"] = "item_knn"
    neighbours: int = Field(default=100, ge=1, description="Most similar items kept per item.")
    shrinkage: float = Field(default=0.0, ge=0, description="Added to the cosine denominator (damps rare pairs).")


class TwoTowerConfig(ModelBase):
    """Two-tower model (pipeline/models/two_tower.py): the item tower embeds id + catalog
    attributes; the user tower is the recency-weighted mean of the user's recent items (+ a
    user id embedding when `user_id`); in-batch softmax with logQ correction.

    Defaults were tuned on MovieLens-100K against a validation split carved from the training
    events (never the holdout): the user id embedding overfits there (0.21 vs 0.25 NDCG@10).
    """

    kind: Literal["two_tower"] = "two_tower"
    dim: int = Field(default=64, ge=1, le=1024)
    epochs: int = Field(default=8, ge=1, le=1000)
    batch_size: int = Field(default=1024, ge=2, description="Events per step (also the in-batch negatives).")
    learning_rate: float = Field(default=0.005, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    loss: Literal["softmax", "bpr"] = Field(default="softmax", description="softmax: in-batch; bpr: 1 negative.")
    temperature: float = Field(default=0.05, gt=0, description="Scores (cosines) are divided by this.")
    logq_weight: float = Field(default=1.0, ge=0, description="Subtract this * log(item frequency) (softmax only).")
    history: int = Field(default=20, ge=0, le=512, description="Recent items in the user tower (0: user id only).")
    history_half_life: float | None = Field(default=5.0, gt=0, description="History weight halves per this many items.")
    user_id: bool = Field(default=False, description="Add a user id embedding to the user tower.")
    use_features: bool = Field(default=True, description="Use catalog attributes in the item tower when present.")
    id_dropout: float = Field(default=0.3, ge=0, lt=1, description="Share of items trained without their id embedding.")
    hidden: int = Field(default=0, ge=0, le=4096, description="Residual MLP width on each tower (0: none).")
    init_std: float = Field(default=0.1, gt=0)

    @model_validator(mode="after")
    def _user_tower_has_input(self) -> TwoTowerConfig:
        if not self.history and not self.user_id:
            raise ValueError("the user tower needs history > 0 or user_id: true")
        return self


class GraphSAGEConfig(ModelBase):
    """GraphSAGE over the user-item graph, trained on sampled neighbourhoods (pipeline/models/graphsage.py).

    Defaults tuned on MovieLens-100K against a validation split of the training events.
    """

    kind: Literal["graphsage"] = "graphsage"
    dim: int = Field(default=64, ge=1, le=1024)
    fanouts: tuple[int, ...] = Field(default=(10, 5), min_length=1, max_length=4, description="Neighbours per hop.")
    epochs: int = Field(default=30, ge=1, le=1000)
    batch_size: int = Field(default=1024, ge=1, description="Training pairs per step.")
    learning_rate: float = Field(default=0.005, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    use_features: bool = Field(default=True, description="Add catalog attributes to item node inputs when present.")
    recency_half_life: float | None = Field(
        default=20.0, gt=0, description="Positive pairs are drawn in proportion to recency (None: uniformly)."
    )
    recency_floor: float = Field(default=0.1, ge=0, le=1)
    init_std: float = Field(default=0.1, gt=0)


class LightGCNConfig(ModelBase):
    """LightGCN (He et al. 2020) over the recency-weighted user-item graph, BPR loss.

    Every step propagates over the whole graph: a GPU model beyond ~1M training pairs.
    Defaults tuned on MovieLens-100K against a validation split of the training events.
    """

    kind: Literal["lightgcn"] = "lightgcn"
    dim: int = Field(default=64, ge=1, le=1024)
    layers: int = Field(default=3, ge=0, le=8)
    epochs: int = Field(default=50, ge=1, le=5000)
    batch_size: int = Field(default=4096, ge=1, description="Training pairs per step (one propagation each).")
    learning_rate: float = Field(default=0.02, gt=0)
    regularization: float = Field(default=1e-3, ge=0, description="L2 on the layer-0 rows a batch touches.")
    recency_half_life: float | None = Field(
        default=20.0,
        gt=0,
        description="Edge weights and positive draws halve per this many newer pairs of the user (None: all 1).",
    )
    recency_floor: float = Field(default=0.1, ge=0, le=1)
    init_std: float = Field(default=0.1, gt=0)


class SASRecConfig(ModelBase):
    """SASRec (Kang & McAuley 2018): causal self-attention over each user's recent items
    (pipeline/models/sasrec.py). The user vector is the encoder's output at the newest item,
    so serving recomputes it from the seen list when events arrive (no solve, no retraining).

    Trained to predict every next item of each user's sequence with a softmax over all items,
    or, on catalogs larger than `negatives`, over that many shared uniform negatives per step
    (the full softmax costs positions x items per step). Defaults follow the paper (2 blocks,
    1 head, 0.2 dropout, lr 1e-3, batch 128) with 64 dims and 50 items.
    """

    kind: Literal["sasrec"] = "sasrec"
    dim: int = Field(default=64, ge=2, le=1024)
    layers: int = Field(default=2, ge=1, le=8)
    heads: int = Field(default=1, ge=1, le=16, description="Attention heads; must divide dim.")
    max_len: int = Field(default=50, ge=2, le=512, description="Most recent items the encoder reads.")
    dropout: float = Field(default=0.2, ge=0, lt=1)
    epochs: int = Field(default=30, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=1, description="Sequences (windows of max_len items) per step.")
    learning_rate: float = Field(default=0.001, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    negatives: int = Field(
        default=4096,
        ge=0,
        description="Catalogs up to this many items: softmax over all; larger: this many shared uniform "
        "negatives per step (0: always all).",
    )
    init_std: float = Field(default=0.05, gt=0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> SASRecConfig:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


MODEL_CONFIGS: tuple[type[ModelBase], ...] = (
    ALSConfig,
    BPRConfig,
    TwoTowerConfig,
    GraphSAGEConfig,
    LightGCNConfig,
    EASEConfig,
    ItemKNNConfig,
    SASRecConfig,
)


def _kind_of(value: Any) -> str:
    """The discriminator: a tenant file may leave `kind` out, meaning ALS (the default model)."""
    return value.get("kind", "als") if isinstance(value, dict) else getattr(value, "kind", "als")


# Spelled out (not built from MODEL_CONFIGS) so type checkers see the union; a test checks the two agree.
ModelConfig = Annotated[
    Annotated[ALSConfig, Tag("als")]
    | Annotated[BPRConfig, Tag("bpr")]
    | Annotated[TwoTowerConfig, Tag("two_tower")]
    | Annotated[GraphSAGEConfig, Tag("graphsage")]
    | Annotated[LightGCNConfig, Tag("lightgcn")]
    | Annotated[EASEConfig, Tag("ease")]
    | Annotated[ItemKNNConfig, Tag("item_knn")]
    | Annotated[SASRecConfig, Tag("sasrec")],
    Discriminator(_kind_of),
]

# Celery/Kubernetes queue per model family: CPU workers take the matrix factorisations, GPU
# workers the neural models. LocalExecutor ignores queues.
MODEL_QUEUES = {
    "popularity": "cpu",
    "als": "cpu",
    "bpr": "cpu",
    "two_tower": "gpu",
    "graphsage": "gpu",
    "lightgcn": "gpu",
    "ease": "cpu",
    "item_knn": "cpu",
    "sasrec": "gpu",
}


def model_config(data: dict[str, Any]) -> ModelBase:
    """Parse a stored model config (e.g. model.json's "config") by its kind."""
    by_kind = {c.model_fields["kind"].default: c for c in MODEL_CONFIGS}
    kind = data.get("kind", "als")
    if kind not in by_kind:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(by_kind)}")
    return by_kind[kind].model_validate(data)
