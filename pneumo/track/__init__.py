"""Experiment tracking with MLflow: where runs go, and one run's logging that never fails a job."""
