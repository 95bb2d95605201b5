"""Honest offline evaluation of the reranker: time split, the serving candidate stage replayed point-in-time,
strong baselines, ablations, metrics with session-bootstrap intervals, and the report (docs/evaluation.md)."""

from insession.evaluate.data import Dataset, load_real, load_synthetic
from insession.evaluate.metrics import Estimate, PerRequest, bootstrap, paired_difference, score_requests
from insession.evaluate.runner import ABLATIONS, EvalConfig, Results, run
from insession.evaluate.split import TimeSplit, before, requests
from insession.train.replay import CandidateSets, build_candidates, stage_proposer

__all__ = [
    "ABLATIONS",
    "CandidateSets",
    "Dataset",
    "EvalConfig",
    "Estimate",
    "PerRequest",
    "Results",
    "TimeSplit",
    "before",
    "bootstrap",
    "build_candidates",
    "load_real",
    "load_synthetic",
    "paired_difference",
    "requests",
    "run",
    "score_requests",
    "stage_proposer",
]
