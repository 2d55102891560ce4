"""Airflow local settings of a recsys deployment: copy to $AIRFLOW_HOME/config/ (the image does).

Airflow imports this module in every component. The ones that fork task processes (the
scheduler with the LocalExecutor, Celery workers) import the stages' heavy libraries here
once, so each task inherits them instead of importing them again (pipeline/preload.py).
"""

import sys

from pipeline.preload import preload_for

__all__: list[str] = []  # no Airflow policy or setting is overridden here

preload_for(sys.argv)
