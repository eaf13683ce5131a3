-- One database per server (what `headbench up --backend postgres` creates as <name>_mlflow / <name>_prefect).
CREATE DATABASE headbench_mlflow;
CREATE DATABASE headbench_prefect;
