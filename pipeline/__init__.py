"""recsys-pipeline: multi-tenant recommendation pipelines. Importable without Airflow."""

__version__ = "0.1.0"
