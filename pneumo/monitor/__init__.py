"""Monitoring without labels: drift statistics against a bundle's reference, the serving window,
and label-shift (prevalence) estimation."""
