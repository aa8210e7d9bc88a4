"""`pneumo train` on Ray Train: the config, the driver, one worker's loop and the bundle export."""
