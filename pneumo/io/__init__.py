"""Storage, the one read path and the one preprocessing.

- `storage`: `Location` (a path on a local or S3 filesystem), bytes in and out, one filesystem cache;
- `reading`: `read_image(location, spec)` -> model-ready image or a typed error;
- `preprocess`: decode -> grayscale -> resize -> equalise -> normalise, with the model's `InputSpec`.
"""
