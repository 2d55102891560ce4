"""Online experiments: assignment (assign.py), interleaving (interleave.py), the analysis
(analysis.py), the daily report (report.py) and challenger promotion (promote.py)."""
