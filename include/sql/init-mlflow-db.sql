-- MLflow gets its own database: MLflow and Airflow both run Alembic (alembic_version table).
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
