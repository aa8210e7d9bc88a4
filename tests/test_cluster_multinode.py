"""A real two-node Ray cluster on this machine, used the way a cluster is used: through the Jobs API.

The cluster is the one a user starts: `pneumo cluster up --workers 1` (pneumo/cluster.py) runs
`ray start --head` and `ray start --address ...` on 127.0.0.1, each with its own `--temp-dir` (so its
session, sockets and logs are its own). The batch-scoring entry point is submitted with
`pneumo.submit` (JobSubmissionClient, runtime_env working_dir = this repository, exactly as `ray job
submit --working-dir . -- python ray_jobs/batch_score.py ...`), and the test checks that it
SUCCEEDED, that its tasks and actors ran on both nodes (Ray's state API, through the dashboard) and
that the output has exactly one row per input file.

Teardown is `pneumo cluster down`, which never uses `ray stop` (it kills every Ray process on the
machine, including the session's shared `ray_local`): each node is a `ray start --block` process in
its own process group; SIGTERM makes it stop the processes it started, and anything left whose
command line names this cluster's folder is then killed by pid. The test then checks nothing of it
is left.

The cluster runs with Ray token authentication, as a real one should: `pneumo cluster up` generates
a token in a 0600 file, both nodes read it (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH`, as a pod
reads it from a mounted Secret), the job is submitted with `pneumo submit --token-file`, and requests
without the token (or with a wrong one) are refused with a clear message that never shows the token.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_ports

from pneumo.cluster import LocalCluster, own_pids

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 180
N_IMAGES = 16


def _cluster_cli(action: str, root: Path, *extra: str, timeout: float = 3 * START_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "pneumo"), "cluster", action, "--dir", str(root), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[LocalCluster]:
    """`pneumo cluster up --workers 1` (real `ray start` processes), `pneumo cluster down` at the end."""
    root = Path(tempfile.mkdtemp(prefix="pnc", dir="/tmp"))  # short: Ray's unix sockets live under it
    (dashboard_port,) = free_ports(1)
    try:
        up = _cluster_cli("up", root, "--workers", "1", "--cpus-per-node", "2",
                          "--dashboard-port", str(dashboard_port), "--timeout-s", str(START_TIMEOUT_S))
        assert up.returncode == 0, (up.stdout, up.stderr[-3000:])
        assert f"http://127.0.0.1:{dashboard_port}" in up.stdout and "token auth on" in up.stdout, up.stdout
        cluster = LocalCluster.load(root)
        assert cluster is not None and set(cluster.nodes) == {"head", "worker1"}
        # the token is private: the file 0600 in a 0700 folder
        assert cluster.token_file.stat().st_mode & 0o777 == 0o600 and root.stat().st_mode & 0o777 == 0o700
        assert len(cluster.alive_nodes()) == 2
        # a fresh cluster: `pneumo submit list` says so in one line
        listed = subprocess.run([str(VENV_BIN / "pneumo"), "submit", "list", "--address", cluster.dashboard,
                                 "--token-file", str(cluster.token_file)], capture_output=True, text=True, timeout=60)
        assert (listed.returncode, listed.stdout) == (0, f"no jobs on {cluster.dashboard}\n"), listed.stderr[-2000:]
        yield cluster
    finally:
        down = _cluster_cli("down", root, timeout=120)
        leftover = own_pids(root)
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(root.glob("*.log")))
        shutil.rmtree(root, ignore_errors=True)
        assert down.returncode == 0 and "stopped 2 node(s)" in down.stdout, (down.stdout, down.stderr, logs)
        assert not leftover, f"processes of the test cluster survived `pneumo cluster down`: {leftover}"


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


def test_no_cluster_at_the_address_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    """Nothing listening: exit 2, one line naming the address and both ways out, no traceback; and
    `pneumo cluster status` / `down` with nothing recorded say so."""
    (port,) = free_ports(1)
    proc = subprocess.run([str(VENV_BIN / "pneumo"), "submit", "list", "--address", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr and "pneumo cluster up" in proc.stderr and "--address" in proc.stderr
    status = _cluster_cli("status", tmp_path / "none", timeout=60)
    assert status.returncode == 1 and "no cluster up" in status.stdout and "pneumo cluster up" in status.stdout
    down = _cluster_cli("down", tmp_path / "none", timeout=60)
    assert down.returncode == 0 and "no cluster recorded" in down.stdout


@pytest.mark.parametrize("args, line", [
    (["up", "--workers", "-1"], "workers: -1 is negative"),
    (["sideways"], "action: 'sideways' is not one of up, down, status"),
    (["up", "--dashboard-port", "{taken}"], "port {taken} on 127.0.0.1 is taken; pass --dashboard-port"),
])
def test_cluster_mistakes_are_one_line_and_exit_2(args: list[str], line: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = str(held.getsockname()[1])
        args, line = [a.replace("{taken}", taken) for a in args], line.replace("{taken}", taken)
        proc = _cluster_cli(args[0], tmp_path / "c", *args[1:], timeout=60)
    assert proc.returncode == 2 and line in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "c" / "cluster.json").exists()
