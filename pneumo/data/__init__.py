"""Data sets: listing archives, labels, patient ids, patient-grouped splits, Ray Data ingest,
synthetic X-rays and `pneumo eda`."""
