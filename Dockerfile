# One image for every service of docker-compose.yml: Airflow components, workers and serving.
FROM apache/airflow:3.3.2-python3.11

USER airflow
WORKDIR /opt/airflow
COPY --chown=airflow:root requirements.txt constraints.txt pyproject.toml README.md /opt/airflow/
# CeleryExecutor's provider is in requirements.txt (kombu 5.7 is the first to accept redis-py 8).
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /opt/airflow/requirements.txt -c /opt/airflow/constraints.txt
COPY --chown=airflow:root pipeline /opt/airflow/pipeline
RUN pip install --no-cache-dir --no-deps /opt/airflow
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
COPY --chown=airflow:root include /opt/airflow/include
# the scheduler and Celery workers preload the stages' libraries for the tasks they fork (pipeline/preload.py)
COPY --chown=airflow:root include/airflow/config/airflow_local_settings.py /opt/airflow/config/airflow_local_settings.py
