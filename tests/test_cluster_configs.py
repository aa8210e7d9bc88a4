"""cluster/ configs are valid and point only at things that exist in this repository.

- every manifest parses; KubeRay objects are `ray.io/v1` at this Ray version;
- every RayJob entrypoint names a ray_jobs/*.py script that exists, and its flags (and --config
  recipe) are accepted by that job's own config dataclass;
- the Serve config (and the RayService's embedded serveConfigV2) pass Ray Serve's schema, and
  rayservice.yaml is up to date with serve_app/config.yaml;
- every KubeRay object validates strictly (unknown fields are errors) against the real CRDs in
  ../shared/kuberay-crds/, and every core object (Secret, CronJob, ConfigMap, RBAC), including what
  the kustomize generators make, against the Kubernetes API schemas (kubernetes-validate);
- no manifest applies a Secret value or a placeholder; every object that serves reads the API key
  from a Secret;
- cluster/aws.yaml passes the autoscaler schema shipped inside the ray package, with token auth on
  and the dashboard off 0.0.0.0;
- `pneumo submit` builds the runtime_env it documents and refuses bad input with a clear message.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = REPO / "serve_app" / "config.yaml"
PLANNED = [  # files the cluster configs are written against (other helpers own most of them)
    "ray_jobs/train.py", "ray_jobs/batch_score.py", "ray_jobs/evaluate.py",
    "serve_app/app.py", "serve_app/config.yaml",
    "cluster/Dockerfile", "cluster/aws.yaml", "cluster/render_rayservice.py",
    "cluster/kuberay/common.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-train.yaml",
    "cluster/rayservice.template.yaml", "cluster/kuberay/rayservice.yaml",
    "cluster/kuberay/secrets/kustomization.yaml",
    "cluster/kuberay/nightly/kustomization.yaml", "cluster/kuberay/nightly/cronjob.yaml",
    "cluster/kuberay/nightly/rayjob-batch-score.yaml", "cluster/kuberay/nightly/raycronjob.yaml",
]


def manifests(templates: bool = False) -> list[Path]:
    """Every YAML under cluster/kuberay (templates only when asked: they are not applied)."""
    return sorted(p for p in KUBERAY.rglob("*.yaml") if templates or not p.name.endswith(".template.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifests() for d in docs(p)]


def kind(k: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in all_docs() if d.get("kind") == k]


def ray_job_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) for every RayJob and every RayCronJob's jobTemplate."""
    out = [(f"{p.relative_to(REPO)}", d["spec"]) for p, d in kind("RayJob")]
    out += [(f"{p.relative_to(REPO)} (jobTemplate)", d["spec"]["jobTemplate"]) for p, d in kind("RayCronJob")]
    return out


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the RayCluster, every RayJob and the RayService."""
    out = [(f"{p.relative_to(REPO)}", d["spec"]) for p, d in kind("RayCluster")]
    out += [(w, s["rayClusterSpec"]) for w, s in ray_job_specs()]
    out += [(f"{p.relative_to(REPO)}", d["spec"]["rayClusterConfig"]) for p, d in kind("RayService")]
    return out


def pod_containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------- files and parsing


@pytest.mark.parametrize("rel", PLANNED)
def test_planned_file_exists(rel: str) -> None:
    assert (REPO / rel).is_file(), f"{rel} is referenced by cluster/ configs or README but does not exist"


def test_every_manifest_parses_and_kuberay_objects_are_v1() -> None:
    found = [(p, d) for p in manifests(templates=True) for d in docs(p)]
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob", "CronJob"} <= {d["kind"] for _, d in found}
    for path, doc in found:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
        assert doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName") \
            or doc["kind"] == "Kustomization", f"{path}: {doc['kind']} has no name"
        if doc["kind"] in ("RayCluster", "RayJob", "RayService", "RayCronJob"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path}: KubeRay v1.x objects are ray.io/v1"


def test_ray_versions_and_images_match_the_installed_ray() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)", dockerfile, re.M)
    assert base and base.group(1) == f"rayproject/ray:{ray.__version__}-py311", dockerfile[:400]
    assert "-gpu" in dockerfile and "pip install" in dockerfile
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"cluster/Dockerfile copies {item}, which does not exist"
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']}"
        for group, c in pod_containers(spec):
            image = c["image"]
            assert image.startswith("registry.example.com/pneumo:"), f"{where} {group}: image {image}"
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            assert image.endswith("-gpu") == bool(gpus), f"{where} {group}: GPU image iff nvidia.com/gpu"


def test_raycluster_has_head_and_autoscaling_cpu_and_gpu_groups() -> None:
    (_, cluster), = kind("RayCluster")
    for where, spec in [("RayCluster", cluster["spec"])] + [(w, s) for w, s in cluster_specs()
                                                             if "rayservice" in w]:
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{where}: head runs no work"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}, where
        for g in groups.values():
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']}"
            assert g["maxReplicas"] > g["minReplicas"], f"{where}: {g['groupName']} cannot scale"
        gpu = groups["gpu"]["template"]["spec"]
        limits = gpu["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
        assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_every_pod_reads_s3_settings_from_common_objects() -> None:
    common = {(d["kind"], d["metadata"]["name"]) for d in docs(KUBERAY / "common.yaml")}
    assert ("ServiceAccount", "pneumo-ray") in common and ("ConfigMap", "pneumo-env") in common
    for where, spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "pneumo-ray", where
            refs = {next(iter(r)): r[next(iter(r))]["name"] for r in pod["containers"][0]["envFrom"]}
            assert refs == {"configMapRef": "pneumo-env", "secretRef": "pneumo-s3"}, where


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _from_secret(env: dict[str, dict], name: str) -> tuple[str, str] | None:
    ref = (env.get(name) or {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def test_every_ray_pod_has_token_auth_from_the_secret() -> None:
    """Ray token auth everywhere: KubeRay's authOptions on every Ray cluster spec (the operator, the
    RayJob submitter and the RayService reconciler then send the token) and, in every Ray container,
    RAY_AUTH_MODE=token with RAY_AUTH_TOKEN from the Secret pneumo-ray-auth (never a literal)."""
    specs = cluster_specs()
    assert len(specs) >= 5  # RayCluster, 2 RayJobs, the RayCronJob's template, the RayService
    for where, spec in specs:
        assert spec.get("authOptions") == {"mode": "token", "secretName": "pneumo-ray-auth"}, where
        for group, c in pod_containers(spec):
            env = _env(c)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where} {group}"
            assert _from_secret(env, "RAY_AUTH_TOKEN") == ("pneumo-ray-auth", "auth_token"), f"{where} {group}"
            assert "value" not in env["RAY_AUTH_TOKEN"], f"{where} {group}: a literal token"
    generators = {g["name"]: g for g in kustomization(KUBERAY / "secrets")["secretGenerator"]}
    assert generators["pneumo-ray-auth"]["files"] == ["auth_token"]


def test_every_object_that_serves_reads_its_api_key_from_a_secret() -> None:
    """The RayService and the RayCluster (which exposes port 8000) give every container
    PNEUMO_API_KEY from Secret pneumo-serve-api-key, so the app never starts open on a cluster."""
    from pneumo.serve.config import API_KEY_ENV

    serving = [(f"{p.relative_to(REPO)}", d["spec"]) for p, d in kind("RayCluster")]
    serving += [(f"{p.relative_to(REPO)}", d["spec"]["rayClusterConfig"]) for p, d in kind("RayService")]
    assert len(serving) == 2
    for where, spec in serving:
        for group, c in pod_containers(spec):
            env = _env(c)
            assert _from_secret(env, API_KEY_ENV) == ("pneumo-serve-api-key", "api_key"), f"{where} {group}"
            assert "value" not in env[API_KEY_ENV], f"{where} {group}: a literal key"
    generators = {g["name"]: g for g in kustomization(KUBERAY / "secrets")["secretGenerator"]}
    assert generators["pneumo-serve-api-key"]["files"] == ["api_key"]


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


PLACEHOLDER = re.compile(r"REPLACE|CHANGEME|CHANGE-ME|<your|xxxxx", re.I)


def _strings(obj: object) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_no_manifest_applies_a_secret_value_or_a_placeholder() -> None:
    """Whatever `kubectl apply -R -f cluster/` or `-k` would apply: no Secret carries data, no
    secretGenerator has literals, no value is a placeholder; the generators' files are .gitignore'd."""
    found = [(p, d) for p in sorted(CLUSTER.rglob("*.y*ml")) for d in docs(p)]
    assert len(found) > 10
    for path, doc in found:
        where = path.relative_to(REPO)
        if doc.get("kind") == "Secret":
            assert not (doc.get("data") or doc.get("stringData")), f"{where}: a Secret with values"
        for gen in doc.get("secretGenerator") or []:
            assert not gen.get("literals") and not gen.get("envs"), f"{where}: {gen['name']} has values"
        bad = [s for s in _strings(doc) if PLACEHOLDER.search(s)]
        assert bad == [], f"{where}: placeholders {bad[:3]}"
    for gen in kustomization(KUBERAY / "secrets")["secretGenerator"]:
        for f in gen["files"]:
            rel = (KUBERAY / "secrets" / f).relative_to(REPO)
            ignored = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO).returncode == 0
            assert ignored, f"{rel} holds a secret value and must be .gitignore'd"


# ---------------------------------------------------------------- strict schemas

CRDS = Path(os.environ.get("PNEUMO_KUBERAY_CRDS") or REPO.parent / "shared" / "kuberay-crds")


def _strict(schema: object) -> object:
    """The CRD schema with unknown fields forbidden wherever it lists properties (as the API server's
    strict field validation does), except under x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_validators() -> dict[str, object]:
    """kind -> a jsonschema validator of ray.io/v1 objects, from the real CRDs."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (set PNEUMO_KUBERAY_CRDS)")
    out = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server itself
        out[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return out


def _errors(validator: object, doc: dict) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message[:200]}"
            for e in validator.iter_errors(doc)]  # type: ignore[attr-defined]


def test_kuberay_objects_validate_strictly_against_the_crds() -> None:
    validators = crd_validators()
    assert {"RayCluster", "RayJob", "RayService", "RayCronJob"} <= set(validators)
    objects = [(p, d) for p, d in all_docs() if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for _, d in objects} == {"RayCluster", "RayJob", "RayService", "RayCronJob"}
    for path, doc in objects:
        assert _errors(validators[doc["kind"]], doc) == [], f"{path.relative_to(REPO)}"
    (path, cluster), = kind("RayCluster")  # the check can fail: an unknown field is an error
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    assert any("envFrm" in e for e in _errors(validators["RayCluster"], broken))


def generated_objects() -> list[dict]:
    """What the kustomize generators make (ConfigMap from files; Secrets from files, here with a
    stand-in value): kustomize's own output shape, for the schema check."""
    import base64

    out = []
    for folder in sorted({p.parent for p in KUBERAY.rglob("kustomization.yaml")}):
        k = kustomization(folder)
        labels = (k.get("generatorOptions") or {}).get("labels")
        meta = lambda name, labels=labels: {"name": name, **({"labels": labels} if labels else {})}  # noqa: E731
        for gen in k.get("configMapGenerator") or []:
            data = {f: (folder / f).read_text() for f in gen["files"]}
            out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(gen["name"]), "data": data})
        for gen in k.get("secretGenerator") or []:
            data = {f: base64.b64encode(b"stand-in").decode() for f in gen["files"]}
            out.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                        "metadata": meta(gen["name"]), "data": data})
    return out


def test_core_objects_pass_the_kubernetes_schemas() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    core = [(str(p.relative_to(REPO)), d) for p, d in all_docs()
            if d["apiVersion"] != "ray.io/v1" and d["kind"] != "Kustomization"]
    core += [(f"generated {d['kind']} {d['metadata']['name']}", d) for d in generated_objects()]
    kinds = {d["kind"] for _, d in core}
    assert {"Secret", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds, kinds
    version = latest_version()
    for where, doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message[:300]}")
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        (_, cron), = kind("CronJob")
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "schedul": "x"}}, version, strict=True)


# ---------------------------------------------------------------- RayJob entrypoints


def _job_config_class(script: Path) -> type:
    """The config dataclass a ray_jobs script parses: `from M import main` -> `parse_config(Cls` in M."""
    tree = ast.parse(script.read_text())
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and any(a.name == "main" for a in n.names)]
    assert modules, f"{script.name}: expected `from pneumo.<module> import main`"
    module = importlib.import_module(modules[0])
    source = Path(module.__file__).read_text()
    match = re.search(r"parse_config\(\s*(\w+)", source)
    assert match, f"{modules[0]} has no parse_config(ConfigClass, ...)"
    return getattr(module, match.group(1))


def check_entrypoint(entrypoint: str, where: str) -> list[str]:
    """Assert `python ray_jobs/X.py ARGS` exists and X's config accepts ARGS; returns argv."""
    from pneumo.config import parse_config

    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("ray_jobs/"), f"{where}: entrypoint {entrypoint!r}"
    script = REPO / argv[1]
    assert script.is_file(), f"{where}: {argv[1]} does not exist"
    if "--config" in argv:
        recipe = argv[argv.index("--config") + 1]
        assert (REPO / recipe).is_file(), f"{where}: recipe {recipe} does not exist"
    cls = _job_config_class(script)
    cwd = os.getcwd()
    os.chdir(REPO)  # recipes are relative to the working_dir, as on the cluster
    try:
        parse_config(cls, argv[2:], prog=argv[1])
    except SystemExit as exc:
        pytest.fail(f"{where}: {argv[1]} rejects its arguments (exit {exc.code}): {entrypoint}")
    finally:
        os.chdir(cwd)
    return argv


def test_rayjob_entrypoints_exist_and_their_flags_parse() -> None:
    specs = ray_job_specs()
    scripts = set()
    for where, spec in specs:
        argv = check_entrypoint(spec["entrypoint"], where)
        scripts.add(argv[1])
        assert spec["shutdownAfterJobFinishes"] is True, where
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == "/home/ray/pneumo", f"{where}: the image's code folder"
        # data and bundles on S3 (or a registry version), the tracking server over HTTP: nothing node-local
        assert all(a.startswith(("s3://", "http://", "https://")) for a in argv[2:] if "://" in a), where
        assert all(a.startswith("models:/") for a in argv[2:] if ":/" in a and "://" not in a), where
    assert {"ray_jobs/train.py", "ray_jobs/batch_score.py"} <= scripts
    train = [s for w, s in specs if "train.py" in s["entrypoint"]][0]
    assert "--storage-path s3://" in train["entrypoint"], "checkpoints must go to S3"
    assert "--gpus-per-worker" in train["entrypoint"]


def test_each_training_rayjob_is_a_new_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """rayjob-train.yaml's --name ends in {job}: the Ray job's submission id, which the job supervisor
    hands the entrypoint (RAY_JOB_CONFIG_JSON_ENV_VAR metadata) and KubeRay makes unique per RayJob.
    Two RayJobs are two runs; a given --name (no {job}) still resumes that run."""
    from pneumo.config import parse_config
    from pneumo.train.config import TrainConfig

    (_, job), = [(p, d) for p, d in kind("RayJob") if p.name == "rayjob-train.yaml"]
    argv = shlex.split(job["spec"]["entrypoint"])
    name = argv[argv.index("--name") + 1]
    assert name.endswith("{job}"), f"--name {name}: every RayJob would resume the same run"
    names = []
    monkeypatch.chdir(REPO)  # the recipe path is relative to the working_dir, as on the cluster
    for submission_id in ("pneumo-train-x7k2p-abcde", "pneumo-train-q9r4t-fghij"):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
            {"runtime_env": {}, "metadata": {"job_submission_id": submission_id, "job_name": submission_id}}))
        names.append(parse_config(TrainConfig, argv[2:], prog="train").run_name)
    assert names == ["efficientnet_lite0-pneumo-train-x7k2p-abcde", "efficientnet_lite0-pneumo-train-q9r4t-fghij"]
    resumed = argv[2:argv.index("--name") + 1] + [names[0]] + argv[argv.index("--name") + 2:]
    assert parse_config(TrainConfig, resumed, prog="train").run_name == names[0]


def test_nightly_scoring_is_a_cronjob_creating_an_incremental_rayjob() -> None:
    nightly = KUBERAY / "nightly"
    kustom = yaml.safe_load((nightly / "kustomization.yaml").read_text())
    for rel in kustom["resources"]:
        assert (nightly / rel).is_file(), rel
    (generator,) = kustom["configMapGenerator"]
    for rel in generator["files"]:
        assert (nightly / rel).is_file(), rel
    assert kustom["generatorOptions"]["disableNameSuffixHash"] is True
    (_, cron), = kind("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert re.fullmatch(r"\S+ \S+ \* \* \*", cron["spec"]["schedule"]), "nightly"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    volume = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    assert volume["rayjob"] == generator["name"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    script = pod["containers"][0]["args"][0]
    assert f"kubectl create -f {mount}/rayjob-batch-score.yaml" in script
    roles = [d for p, d in all_docs() if d["kind"] == "Role" and p.parent == nightly]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for role in roles for r in role["rules"])
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for p, d in kind("ServiceAccount")}

    rayjob = docs(nightly / "rayjob-batch-score.yaml")[0]
    assert "generateName" in rayjob["metadata"], "kubectl create needs a fresh name per night"
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[1] == "ray_jobs/batch_score.py" and "--incremental" in argv
    (_, cronjob), = kind("RayCronJob")
    assert cronjob["spec"]["jobTemplate"] == rayjob["spec"], "raycronjob.yaml drifted from rayjob-batch-score.yaml"
    assert cronjob["spec"]["schedule"] == cron["spec"]["schedule"]


def test_ray_jobs_scripts_run_as_plain_python_scripts() -> None:
    """`python ray_jobs/X.py --help` works from the repo root: what `ray job submit` runs."""
    scripts = sorted((REPO / "ray_jobs").glob("*.py"))
    assert {p.name for p in scripts} >= {"train.py", "batch_score.py", "evaluate.py"}
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    procs = {p.name: subprocess.Popen([sys.executable, f"ray_jobs/{p.name}", "--help"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in scripts}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray_jobs/{name} --help failed:\n{out[-2000:]}"
        assert "usage:" in out, f"ray_jobs/{name} --help printed no usage:\n{out[-2000:]}"


# ---------------------------------------------------------------- Serve


def test_serve_config_passes_ray_serve_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.syspath_prepend(str(REPO))  # serve_app is imported from the working dir / PYTHONPATH
    from pneumo.serve.app import ServeArgs

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications, "serve_app/config.yaml has no applications"
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"import_path {app.import_path}"
        assert callable(getattr(importlib.import_module(module), attr)), app.import_path
        ServeArgs.model_validate(app.args)


def test_rayservice_is_rendered_from_serve_config_and_valid() -> None:
    from ray.serve.schema import ServeDeploySchema

    from pneumo.serve.app import ServeArgs

    sys.path.insert(0, str(CLUSTER))
    try:
        import render_rayservice
    finally:
        sys.path.remove(str(CLUSTER))
    assert render_rayservice.render() == (KUBERAY / "rayservice.yaml").read_text(), (
        "cluster/kuberay/rayservice.yaml is stale: run `python cluster/render_rayservice.py`")
    (_, service), = kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(embedded)
    source = yaml.safe_load(SERVE_CONFIG.read_text())
    template = yaml.safe_load((CLUSTER / "rayservice.template.yaml").read_text())["spec"]["serveConfigV2"]
    assert [a["import_path"] for a in embedded["applications"]] == [a["import_path"] for a in source["applications"]]
    for app, src in zip(schema.applications, source["applications"]):
        args = ServeArgs.model_validate(app.args)
        assert args.bundle == template["args"]["bundle"] and args.bundle.startswith(("s3://", "models:/"))
        assert [d.name for d in app.deployments] == [d["name"] for d in src.get("deployments", [])]
    assert schema.http_options.host == "0.0.0.0"
    # the committed text is exactly what --check accepts
    assert subprocess.run([sys.executable, str(CLUSTER / "render_rayservice.py"), "--check"],
                          capture_output=True, text=True).returncode == 0


def test_render_refuses_a_template_without_source(tmp_path: Path) -> None:
    sys.path.insert(0, str(CLUSTER))
    try:
        import render_rayservice
    finally:
        sys.path.remove(str(CLUSTER))
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"spec": {"serveConfigV2": {"args": {"bundle": "x"}}}}))
    with pytest.raises(ValueError, match="source"):
        render_rayservice.render(bad)


# ---------------------------------------------------------------- cluster launcher


def test_aws_yaml_passes_the_autoscaler_schema_shipped_with_ray() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # Ray's own check, after filling in the AWS defaults

    types = config["available_node_types"]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["max_workers"] > t["min_workers"] for t in gpu), "autoscaling GPU workers"
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 via instance profiles"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    mounts = config["file_mounts"]
    assert (REPO / mounts["/home/ray/pneumo"]).resolve() == REPO
    assert any("pip install" in c and "/home/ray/pneumo" in c for c in config["setup_commands"])
    # locked by default: Ray token auth on every node, the dashboard on the head's private address
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # where Ray reads the token
    assert mounts["/home/ray/.pneumo/api_key"] == "~/.pneumo/api_key"
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "0.0.0.0" not in head and head.split("--dashboard-host=")[1].startswith("$(hostname -I"), head

    broken = dict(config, unknown_field=1)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ---------------------------------------------------------------- pneumo submit


def test_submit_builds_the_runtime_env_it_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.config import from_dict
    from pneumo.submit import SubmitConfig, build_runtime_env, resolve_address

    monkeypatch.setenv("PNEUMO_TEST_TOKEN", "t0k")
    cfg = from_dict(SubmitConfig, {
        "entrypoint": "python ray_jobs/train.py --help", "working_dir": str(REPO), "pip": "boto3>=1.34",
        "env": ["AWS_ENDPOINT_URL=http://minio:9000"], "env_from": ["PNEUMO_TEST_TOKEN"],
        "excludes": "benchmarks/"})
    assert build_runtime_env(cfg) == {
        "working_dir": str(REPO), "excludes": ["benchmarks/"], "pip": ["boto3>=1.34"],
        "env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000", "PNEUMO_TEST_TOKEN": "t0k"}}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == "http://127.0.0.1:8265"
    assert resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    monkeypatch.delenv("PNEUMO_TEST_TOKEN")
    with pytest.raises(ValueError, match="PNEUMO_TEST_TOKEN"):
        build_runtime_env(cfg)


def test_submit_token_comes_from_the_file_or_rays_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from pneumo.config import ConfigError
    from pneumo.submit import main, resolve_token

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_token(None) is None
    secret = tmp_path / "auth_token"
    secret.write_text("from-the-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(secret))
    assert resolve_token(None) == "from-the-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-env")
    assert resolve_token(None) == "from-the-env"
    other = tmp_path / "mounted"
    other.write_text("from-token-file")
    assert resolve_token(str(other)) == "from-token-file"  # --token-file wins
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_token(str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exc:
        main(["list", "--token-file", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "token_file" in capsys.readouterr().err


def test_submit_cli_refuses_bad_input_with_a_message(capsys: pytest.CaptureFixture) -> None:
    from pneumo.cli import main

    for argv, message in [
        (["submit", "submit"], "entrypoint after --"),
        (["submit", "stop"], "JOB_ID"),
        (["submit", "launch"], "is not one of submit, status, logs, stop, list"),
        (["submit", "submit", "--env", "NOEQUALS", "--", "python", "x.py"], "KEY=VALUE"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_runtime_env_file_is_valid_and_mirrors_pyproject_dependencies() -> None:
    import tomllib

    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(env["pip"]) == sorted(d for d in deps if not d.startswith("ray")), (
        "cluster/runtime_env.yaml pip list drifted from pyproject.toml dependencies")
