"""The Serve application: `serve run serve_app/config.yaml` or `serve deploy serve_app/config.yaml`.

    serve run serve_app.app:build_app bundle=demo_out/train/bundle         # ad hoc, from the repo root
    serve run serve_app/config.yaml                                        # scaling, batching, overload
    pneumo serve demo_out/train/bundle --port 8000                         # the same app via the CLI

`build_app(args: ServeArgs)` is the typed builder: Serve validates the config's `args:` against
`pneumo.serve.app.ServeArgs` (unknown keys rejected) before calling it. It binds the one
deployment, `PneumoService`; its options come from the config's `deployments:` entry.
"""

from pneumo.serve.app import PneumoService, ServeArgs, build_app

__all__ = ["build_app", "ServeArgs", "PneumoService"]
