-- Runs once, on the first start of an empty Postgres volume (docker-entrypoint-initdb.d), as POSTGRES_USER:
-- one database per service. The role and its password come from .env (POSTGRES_USER/POSTGRES_PASSWORD).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
