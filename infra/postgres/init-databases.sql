-- One PostgreSQL server, three databases: the lineage catalog, Prefect's and MLflow's backends.
-- Run once by the postgres image on an empty volume (docker-entrypoint-initdb.d).
CREATE DATABASE moeflow_catalog;
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
