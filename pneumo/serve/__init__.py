"""`pneumo serve` on Ray Serve: the deployment (`app`), its HTTP plumbing (`http_api`) and the CLI."""
