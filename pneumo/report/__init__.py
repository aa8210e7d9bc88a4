"""Metrics (scikit-learn underneath), plots and the evaluation report."""
