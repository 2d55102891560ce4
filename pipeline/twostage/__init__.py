"""Two-stage recommendation: candidates from several sources, then a learned ranker (issue 18).

candidates.py (stage one: sources and their merge), features.py (the ranker's inputs),
ranker.py (a small MLP, listwise loss, safetensors), model.py (fitting without the holdout, recommending),
stage.py (what the stages call), serve.py (the second stage at request time).
"""
