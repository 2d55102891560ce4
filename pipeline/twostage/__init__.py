"""Two-stage recommendation: candidates from several sources, then a learned ranker (issue 18).

candidates.py (stage one: sources and their merge), features.py (the ranker's inputs),
ranker.py (LightGBM LambdaRank, text format), model.py (fitting without the holdout, recommending).
"""
