"""pneumo: distributed training, batch and online scoring of pneumonia classifiers for chest X-rays, on Ray."""

__version__ = "0.1.0"
