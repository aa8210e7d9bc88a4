"""The one artifact: the model bundle (`manifest` without torch, `store` with it), the
`Predictor` over its engines, and `pneumo export` / `pneumo quantize` (`upgrade`)."""
