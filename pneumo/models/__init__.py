"""The model zoo: the registry as plain data (`zoo`), the factory, weights from local files, the
scoring graph and its ONNX export, fine-tuning, calibration, AdaBN and Grad-CAM."""
