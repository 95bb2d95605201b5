"""The candidate-stage replay moved to `insession.train.replay` (training uses it; the trainer may not
import the evaluation); re-exported for callers of the old path."""

from insession.train.replay import CandidateSets, build_candidates, catalogue_of, stage_proposer

__all__ = ["CandidateSets", "build_candidates", "catalogue_of", "stage_proposer"]
