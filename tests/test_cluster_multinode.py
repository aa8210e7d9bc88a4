"""A real two-node Ray cluster on this machine, used the way a cluster is used: through the Jobs API.

`ray start --head` and `ray start --address ...` both run on 127.0.0.1, each with its own
`--temp-dir` (so its session, sockets and logs are its own) and a distinct custom resource. The
batch-scoring entry point is submitted with `pneumo.submit` (JobSubmissionClient, runtime_env
working_dir = this repository, exactly as `ray job submit --working-dir . -- python
ray_jobs/batch_score.py ...`), and the test checks that it SUCCEEDED, that its tasks and actors
ran on both nodes (Ray's state API, through the dashboard) and that the Parquet output has
exactly one row per input file.

Teardown never uses `ray stop` (it kills every Ray process on the machine, including the
session's shared `ray_local`): each node is a `ray start --block` process in its own process
group; SIGTERM makes it stop the processes it started, and anything left whose command line
names this cluster's temp dir is then killed by pid.

The cluster runs with Ray token authentication, as a real one should: the test generates a token,
both nodes read it from a file (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`, as a pod reads it from a
mounted Secret), the job is submitted with `pneumo submit --token-file`, and requests without the
token (or with a wrong one) are refused with a clear message that never shows the token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 180
N_IMAGES = 16


@dataclass
class LocalCluster:
    """Two Ray nodes on 127.0.0.1 started with `ray start --block`, each in its own process group."""

    root: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    token_file: Path
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, name: str, head: bool, num_cpus: int, attempt: int = 0) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.root / f'{name}{attempt}'}",
               f"--resources={json.dumps({name: 1})}", "--disable-usage-stats"]
        # Ports with fixed defaults (agent HTTP 52365, client server 10001...) would collide with any
        # other Ray on this machine (e.g. other test sessions): give every node free ones.
        agent_http, agent_grpc, metrics, runtime_env, client = free_ports(5)
        cmd += [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                    f"--ray-client-server-port={client}"]
        else:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = open(self.root / f"{name}{attempt}.log", "wb")  # noqa: SIM115 - closed with the process
        self.nodes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.root, start_new_session=True)
        log.close()

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard + path, headers=self.auth_headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.load(resp)

    def alive_nodes(self) -> list[dict]:
        summary = self._get("/nodes?view=summary")["data"]["summary"]
        return [n for n in summary if n["raylet"]["state"] == "ALIVE"]

    def wait_until(self, what: str, check, timeout: float = START_TIMEOUT_S) -> None:  # noqa: ANN001
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited ({proc.returncode}) while waiting for {what}\n"
                                       + self.logs())
            try:
                if check():
                    return
            except Exception as exc:  # dashboard not up yet
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"{what} not reached after {timeout}s ({last})\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def own_pids(self) -> list[int]:
        """Processes whose command line names this cluster's temp dir (raylets, GCS, workers...)."""
        marker, pids = str(self.root), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Stop only this cluster's processes (never `ray stop`, which is machine-wide)."""
        live = [p for p in self.nodes.values() if p.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
        for proc in live:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for _ in range(2):
            for pid in self.own_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def start_with_retries(cluster: LocalCluster, name: str, head: bool, attempts: int = 3) -> None:
    """`ray start` gives its raylet 30 s to register with the GCS; a loaded machine can miss that.

    A node whose `ray start` exits during startup is started again (fresh temp dir, fresh head ports).
    """
    for attempt in range(attempts):
        if head and attempt:
            cluster.gcs_port, cluster.dashboard_port = free_ports(2)
        cluster.start_node(name, head=head, num_cpus=2, attempt=attempt)
        log = cluster.root / f"{name}{attempt}.log"
        try:
            cluster.wait_until(f"{name} started", lambda log=log: "Ray runtime started" in log.read_text(errors="replace"))
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="pnc", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs_port, dashboard_port = free_ports(2)
    token_file = root / "auth_token"  # what a pod gets from the Secret (never ~/.ray/auth_token)
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in entrypoints = this venv
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               # token auth on every node, the token from a file (Ray reads RAY_AUTH_TOKEN first, then
               # the file at RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    cluster = LocalCluster(root=root, gcs_port=gcs_port, dashboard_port=dashboard_port, env=env,
                           token_file=token_file)
    try:
        start_with_retries(cluster, "node_head", head=True)
        cluster.wait_until("the dashboard", lambda: cluster._get("/api/version"))
        start_with_retries(cluster, "node_worker", head=False)
        cluster.wait_until("two alive nodes", lambda: len(cluster.alive_nodes()) == 2)
        yield cluster
    finally:
        cluster.stop()
        leftover = cluster.own_pids()
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"processes of the test cluster survived teardown: {leftover}"


def _tiny_archive_and_bundle(tmp: Path) -> tuple[Path, Path, list[str]]:
    """16 small synthetic X-rays + one corrupt file (still one row), and a random-weight seed_cnn bundle."""
    from pneumo.bundle.store import save_bundle
    from pneumo.data.synth import synthesize
    from pneumo.models.factory import get_model
    from pneumo.models.zoo import get_spec

    data = tmp / "archive"
    synthesize(data, N_IMAGES, seed=3, size_range=(64, 96), workers=1)
    (data / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bundle = tmp / "bundle"
    save_bundle(get_model("seed_cnn", 2, weights="none"), str(bundle), "seed_cnn", ["NORMAL", "PNEUMONIA"],
                get_spec("seed_cnn").input)
    inputs = sorted(str(p) for p in data.rglob("*") if p.is_file())
    return data, bundle, inputs


def test_batch_scoring_job_runs_on_both_nodes(two_node_cluster: LocalCluster, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from pneumo.config import from_dict
    from pneumo.score.runs import read_results
    from pneumo.submit import SubmitConfig, make_client, submit, wait

    cluster = two_node_cluster
    nodes = {n["raylet"]["nodeId"] for n in cluster.alive_nodes()}
    assert len(nodes) == 2

    data, bundle, inputs = _tiny_archive_and_bundle(tmp_path)
    out = tmp_path / "scores"
    entrypoint = (f"python ray_jobs/batch_score.py {data} --bundle {bundle} --out {out} "
                  "--min-actors 2 --max-actors 2 --cpus-per-actor 1 --read-batch-size 2 --batch-size 4 "
                  "--precision fp32")
    cfg = from_dict(SubmitConfig, {"entrypoint": entrypoint, "working_dir": str(REPO),
                                   "address": cluster.dashboard, "env": ["OMP_NUM_THREADS=1"],
                                   "token_file": str(cluster.token_file)})
    client = make_client(cfg.address, cfg.token_file)
    job_id = submit(cfg, client)
    try:
        status = wait(client, job_id, timeout_s=JOB_TIMEOUT_S)
    except TimeoutError:
        client.stop_job(job_id)
        raise
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id} {status}:\n{logs[-6000:]}\n{cluster.logs()}"

    # One row per input file, the corrupt one included (as an error row).
    table = read_results(str(out))
    assert sorted(table["path"]) == inputs, logs[-3000:]
    assert len(table) == len(inputs) == N_IMAGES + 1
    statuses = dict(zip(table["path"], table["status"]))
    assert statuses[str(data / "broken.jpeg")] == "error"
    assert sum(s == "ok" for s in statuses.values()) == N_IMAGES

    # Work ran on both nodes: the job's tasks and actors, as Ray's state API reports them.
    ray_job_id = client.get_job_info(job_id).job_id
    state = StateApiClient(address=cluster.dashboard, headers=cluster.auth_headers)
    tasks = state.list(StateResource.TASKS, ListApiOptions(filters=[("job_id", "=", ray_job_id)], limit=10_000),
                       raise_on_missing_output=False)
    actors = state.list(StateResource.ACTORS, ListApiOptions(filters=[("job_id", "=", ray_job_id)], limit=1_000),
                        raise_on_missing_output=False)
    per_node: dict[str, Counter] = {n: Counter() for n in nodes}
    for t in tasks:
        if t.node_id in per_node:
            per_node[t.node_id][t.name] += 1
    actor_nodes = {a.node_id for a in actors if "MapWorker" in (a.class_name or "") and a.node_id}
    detail = {n[:8]: dict(c) for n, c in per_node.items()}
    for node, names in per_node.items():  # Ray Data work (reads, preprocessing, scoring), not just the driver
        assert any("MapBatches" in name or "MapWorker" in name for name in names), (
            f"no scoring work ran on node {node[:8]}: tasks per node {detail}, actors on {actor_nodes}")
    assert actor_nodes and actor_nodes <= nodes, f"scoring actors on {actor_nodes}"

    # `pneumo submit status/logs/list` read the same job through the CLI, with the token from
    # --token-file or from Ray's own RAY_AUTH_TOKEN; the token is never printed.
    from pneumo.submit import main

    token = cluster.token_file.read_text().strip()
    tf = ["--token-file", str(cluster.token_file)]
    assert main(["status", job_id, "--address", cluster.dashboard, *tf]) == 0
    assert '"status": "SUCCEEDED"' in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_TOKEN", token)
        assert main(["list", "--address", cluster.dashboard]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["logs", job_id, "--follow", "--timeout-s", "60", "--address", cluster.dashboard, *tf]) == 0
    followed = capsys.readouterr()
    assert "committed to" in followed.out and followed.out.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert token not in followed.out + followed.err


def test_requests_without_the_token_are_refused(two_node_cluster: LocalCluster, tmp_path: Path) -> None:
    """`pneumo submit` with no token (clean env, no ~/.ray/auth_token) or a wrong one: exit 2, a clear
    message, nothing submitted, and the cluster's token appears nowhere in the output."""
    cluster = two_node_cluster
    token = cluster.token_file.read_text().strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    for extra, status in [([], "Unauthorized"), (["--token-file", str(wrong)], "Forbidden")]:
        proc = subprocess.run([sys.executable, "-m", "pneumo.submit", "submit", "--address", cluster.dashboard,
                               "--working-dir", "", *extra, "--", "python", "-c", "print(1)"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr[-3000:])
        assert "refused the request" in proc.stderr and status in proc.stderr, proc.stderr[-3000:]
        assert "RAY_AUTH_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
        assert token not in proc.stdout + proc.stderr
        assert "submitted" not in proc.stdout
    # nothing was submitted; with the token a job goes through, and in it `pneumo train --name X-{job}`
    # gets the job's submission id (what rayjob-train.yaml relies on for one run per RayJob)
    from pneumo.config import from_dict
    from pneumo.submit import SubmitConfig, make_client, submit, wait

    client = make_client(cluster.dashboard, str(cluster.token_file))
    assert all(info.entrypoint != "python -c 'print(1)'" for info in client.list_jobs())
    probe = ("python -c \"from pneumo.config import from_dict; from pneumo.train.config import TrainConfig; "
             "print('RUN', from_dict(TrainConfig, {'data': 'd', 'name': 'efficientnet_lite0-{job}'}).run_name)\"")
    cfg = from_dict(SubmitConfig, {"entrypoint": probe, "working_dir": str(REPO), "address": cluster.dashboard,
                                   "token_file": str(cluster.token_file)})
    job_id = submit(cfg, client)
    assert wait(client, job_id, timeout_s=JOB_TIMEOUT_S) == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    assert f"RUN efficientnet_lite0-{job_id}" in client.get_job_logs(job_id)
