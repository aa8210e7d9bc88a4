"""The one artifact: the model bundle (`manifest` without torch, `store` with it), the
`Predictor` over its engines (`engines`: which one runs here; `gates`: which reduced precision
the bundle has earned), and `pneumo export` / `pneumo quantize` (`upgrade`)."""
