"""`pneumo score` (batch scoring on Ray Data, committed runs, drift and `--adapt`) and
`pneumo evaluate` (the same pipeline over a labelled split)."""
