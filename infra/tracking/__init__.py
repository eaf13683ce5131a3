"""MLflow as the record of runs: the run's lifecycle, params, metrics and artifacts (``runs``), dataset
lineage, plots, and progress read back from MLflow for the console."""
