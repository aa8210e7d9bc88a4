"""`pneumo cluster up/down/status`: a local multi-node Ray cluster on this machine, locked with a token.

    pneumo cluster up [--workers 1] [--cpus-per-node 2] [--dashboard-port 8265] [--dir ~/.pneumo/cluster]
    pneumo cluster status
    pneumo cluster down

`up` starts a head and N worker nodes with `ray start --block` on 127.0.0.1, each in its own process
group and with its own `--temp-dir` under `--dir` (so its sessions, sockets and logs are its own),
with Ray token authentication on every node (`RAY_AUTH_MODE=token`, the token in `DIR/auth_token`,
mode 0600, in a 0700 folder). It waits until every node is alive, records the nodes in
`DIR/cluster.json` and prints the dashboard address and how to submit to it. `down` stops only these
processes: SIGTERM to each `ray start --block` (which stops what it started), then anything whose
command line still names `DIR` is killed by pid. It never runs `ray stop`, which stops every Ray
process on the machine (other users' and other sessions' included).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pneumo.config import ConfigError, UserError, parse_config

ACTIONS = ("up", "down", "status")
START_TIMEOUT_S = 90.0


@dataclass
class ClusterConfig:
    """Start, inspect or stop a local multi-node Ray cluster with token authentication."""

    action: str = field(default="status", metadata={
        "positional": True, "choices": list(ACTIONS), "help": "what to do"})
    dir: str = field(default="~/.pneumo/cluster", metadata={
        "help": "folder for the token, the nodes' temp dirs and logs (keep its path short: Ray's sockets live under it)"})
    workers: int = field(default=1, metadata={"help": "worker nodes beside the head"})
    cpus_per_node: int = field(default=2, metadata={"help": "CPUs each node offers"})
    dashboard_port: int = field(default=8265, metadata={"help": "the head's dashboard / Jobs API port on 127.0.0.1"})
    timeout_s: float = field(default=START_TIMEOUT_S, metadata={"help": "how long each node may take to start"})

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"workers: {self.workers} is negative")
        if self.cpus_per_node < 1:
            raise ConfigError(f"cpus_per_node: {self.cpus_per_node} must be at least 1")
        if not 0 < self.dashboard_port < 65536:
            raise ConfigError(f"dashboard_port: {self.dashboard_port} is not a TCP port")

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.dir)).absolute()


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now (held together so they differ)."""
    held = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalCluster:
    """The nodes of one local cluster, all under `root`: `root/auth_token`, `root/cluster.json`, `root/<node>.log`."""

    root: Path
    dashboard_port: int = 8265
    gcs_port: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node name -> pid of its `ray start --block`

    @property
    def token_file(self) -> Path:
        return self.root / "auth_token"

    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def env(self) -> dict[str, str]:
        """The nodes' environment: no RAY_* from this shell, token auth from the file, this venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in jobs
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        return env

    def make_token(self) -> None:
        """A fresh token, readable by this user only (in a folder only this user may enter)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        self.token_file.chmod(0o600)

    def start_node(self, name: str, head: bool, num_cpus: int, attempt: int = 0) -> Path:
        """One `ray start --block` in its own session; returns its log file."""
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={self.root / f'{name}{attempt}'}",
               "--disable-usage-stats"]
        # Ports with fixed defaults (agent HTTP 52365, client server 10001...) would collide with any
        # other Ray on this machine: give every node free ones.
        agent_http, agent_grpc, metrics, runtime_env, client = free_ports(5)
        cmd += [f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                    f"--ray-client-server-port={client}"]
        else:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        log_path = self.root / f"{name}{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                    cwd=self.root, start_new_session=True)
        self.nodes[name] = proc.pid
        return log_path

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
            for name, pid in self.nodes.items():
                if not pid_alive(pid):
                    raise RuntimeError(f"ray node {name} exited while waiting for {what}\n{self.logs()}")
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - the dashboard is not up yet
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"{what} not reached after {timeout:.0f}s ({last})\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}"
                         for log in sorted(self.root.glob("*.log")))

    def start_with_retries(self, name: str, head: bool, num_cpus: int, timeout: float, attempts: int = 3) -> None:
        """`ray start` gives its raylet 30 s to register with the GCS; a loaded machine can miss that,
        so a node whose `ray start` exits during startup is started again (fresh temp dir, fresh head ports)."""
        for attempt in range(attempts):
            if head and (attempt or not self.gcs_port):
                (self.gcs_port,) = free_ports(1)
            log = self.start_node(name, head=head, num_cpus=num_cpus, attempt=attempt)
            try:
                self.wait_until(f"{name} started", lambda log=log: "Ray runtime started" in log.read_text(errors="replace"),
                                timeout)
                return
            except RuntimeError:
                if attempt == attempts - 1:
                    raise

    def up(self, workers: int, num_cpus: int, timeout: float = START_TIMEOUT_S) -> None:
        """Head, then `workers` worker nodes; returns once all are alive (stops them all on failure)."""
        self.make_token()
        try:
            self.start_with_retries("head", head=True, num_cpus=num_cpus, timeout=timeout)
            self.wait_until("the dashboard", lambda: self._get("/api/version"), timeout)
            for i in range(1, workers + 1):
                self.start_with_retries(f"worker{i}", head=False, num_cpus=num_cpus, timeout=timeout)
            self.wait_until(f"{workers + 1} alive nodes", lambda: len(self.alive_nodes()) == workers + 1, timeout)
        except BaseException:
            self.down()
            raise
        self.save()

    def save(self) -> None:
        state = {"dashboard_port": self.dashboard_port, "gcs_port": self.gcs_port, "nodes": self.nodes}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> LocalCluster | None:
        try:
            state = json.loads((root / "cluster.json").read_text())
        except FileNotFoundError:
            return None
        return cls(root=root, dashboard_port=state["dashboard_port"], gcs_port=state["gcs_port"],
                   nodes={k: int(v) for k, v in state["nodes"].items()})

    def down(self, grace_s: float = 20.0) -> int:
        """Stop only this cluster's processes; returns how many nodes were still running."""
        live = [pid for pid in self.nodes.values() if pid_alive(pid) and str(self.root) in _cmdline(pid)]
        for pid in live:
            _signal(pid, signal.SIGTERM)  # `ray start --block` then stops what it started
        deadline = time.monotonic() + grace_s
        while any(pid_alive(pid) for pid in live) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in live:
            if pid_alive(pid):
                _signal(-pid, signal.SIGKILL)  # its process group
        for _ in range(2):
            for pid in own_pids(self.root):
                _signal(pid, signal.SIGKILL)
            time.sleep(0.5)
        self.state_file.unlink(missing_ok=True)
        return len(live)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(-pid, sig) if pid < 0 else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a child of ours that has exited is reaped, not counted)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def own_pids(root: Path) -> list[int]:
    """Processes whose command line names `root` (raylets, GCS, workers...), this one excepted."""
    marker, pids = str(root), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and marker in _cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _up(cfg: ClusterConfig) -> int:
    cluster = LocalCluster.load(cfg.root)
    if cluster and any(pid_alive(p) for p in cluster.nodes.values()):
        raise UserError(f"a cluster is already up at {cluster.dashboard} ({cfg.root}); `pneumo cluster down` first")
    if _port_taken(cfg.dashboard_port):
        raise UserError(f"port {cfg.dashboard_port} on 127.0.0.1 is taken; pass --dashboard-port to another one")
    cluster = LocalCluster(root=cfg.root, dashboard_port=cfg.dashboard_port)
    cluster.up(cfg.workers, cfg.cpus_per_node, cfg.timeout_s)
    print(f"cluster up: a head and {cfg.workers} worker node(s), {cfg.cpus_per_node} CPUs each, "
          f"dashboard and Jobs API at {cluster.dashboard} (token auth on)")
    print(f"  export RAY_ADDRESS={cluster.dashboard} RAY_AUTH_TOKEN_PATH={cluster.token_file}")
    print("  pneumo submit submit --working-dir . --follow -- python ray_jobs/batch_score.py ...")
    print(f"  pneumo cluster down{'' if cfg.dir == ClusterConfig.dir else f' --dir {cfg.dir}'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`pneumo cluster up|down|status [options]`."""
    cfg = parse_config(ClusterConfig, argv, prog="pneumo cluster")
    cfg.validate()
    if cfg.action == "up":
        return _up(cfg)
    cluster = LocalCluster.load(cfg.root)
    if cfg.action == "down":
        if cluster is None:
            print(f"cluster down: no cluster recorded in {cfg.root}")
            return 0
        print(f"cluster down: stopped {cluster.down()} node(s) of {cluster.dashboard}")
        return 0
    if cluster is None or not any(pid_alive(p) for p in cluster.nodes.values()):
        print(f"no cluster up in {cfg.root} (start one with `pneumo cluster up`)")
        return 1
    print(f"cluster at {cluster.dashboard}: {len(cluster.alive_nodes())} alive node(s), token in {cluster.token_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
