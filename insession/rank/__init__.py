"""Ranking: the candidate stage, the reranker under a deadline, fallbacks, hygiene checks, hot reload."""

from insession.rank.candidates import CandidateQuotas, CandidateSources, PopularItems, propose, sources_for
from insession.rank.fallback import FALLBACKS, fallback_ranking
from insession.rank.hygiene import HygieneRules, apply_hygiene, eligible, purchased_in
from insession.rank.service import (
    REASONS,
    ArtefactRefused,
    ItemExplanation,
    ModelInfo,
    RankConfig,
    RankedItem,
    Ranker,
    RankRequest,
    RankRequestError,
    RankResponse,
)

__all__ = [
    "FALLBACKS",
    "REASONS",
    "ArtefactRefused",
    "CandidateQuotas",
    "CandidateSources",
    "HygieneRules",
    "ItemExplanation",
    "ModelInfo",
    "PopularItems",
    "RankConfig",
    "RankRequest",
    "RankRequestError",
    "RankResponse",
    "RankedItem",
    "Ranker",
    "apply_hygiene",
    "eligible",
    "fallback_ranking",
    "propose",
    "purchased_in",
    "sources_for",
]
