"""Real local services for tests, demos and benchmarks: an S3 server and a Ray cluster on loopback.

`S3Server` runs moto's server mode (a real S3-compatible HTTP endpoint) on 127.0.0.1;
`Relay` stands in front of it as the endpoint clients see, and can be taken down and brought back
(a storage outage; the server keeps its objects); `RayCluster` runs `ray start --head` on loopback
so that jobs go through `ray job submit` exactly as on a real cluster. Each stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# Ray advertises the host's outward address even for a single-machine cluster; this switch (meant
# for laptops) makes it advertise 127.0.0.1 instead, so local clusters stay on loopback.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# Credentials of the throwaway loopback server, never of a real account.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: all are held open while the others are picked (ports
    asked for one at a time can repeat, and Ray refuses a port given to two of its components)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


class S3Server:
    """moto_server on 127.0.0.1:<free port>; `endpoint` is its URL. `refuse_credentials`: the
    server checks every request's access key against its own (empty) user list, so every key is
    refused with 403 InvalidAccessKeyId, as a real endpoint refuses wrong or revoked keys."""

    def __init__(self, refuse_credentials: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.server_env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if refuse_credentials else {}

    def __enter__(self) -> S3Server:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.server_env},
        )

        def up() -> bool:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return True
            except urllib.error.HTTPError:  # it answers (403 when it refuses every key)
                return True
            except OSError:
                return False

        _wait(up, 30, "moto_server")
        return self

    def env(self) -> dict[str, str]:
        return {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint)

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)


class Relay:
    """A TCP relay on 127.0.0.1 in front of a loopback server: `endpoint` is the URL clients use.

    `down()` stops listening and cuts every open connection (clients see connection refused, as in
    an outage of the endpoint); `up()` listens again on the same port. The server behind it, and
    what it holds, is untouched. `upload_rate` (bytes/s per connection, 0: unlimited) slows what
    clients send, so that an upload lasts long enough to be interrupted. A context manager: up on
    entry, closed on exit."""

    def __init__(self, upstream_port: int, upload_rate: float = 0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.upload_rate = upload_rate
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            listener.close()
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _serve(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for src, dst, rate in ((client, server, self.upload_rate), (server, client, 0)):
                threading.Thread(target=self._pump, args=(src, dst, rate), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 14 if rate else 1 << 16):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def __enter__(self) -> Relay:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()


START_ATTEMPTS = 3


class RayCluster:
    """A head node started with `ray start --head` on loopback, in its own temp dir."""

    def __init__(self, num_cpus: int = 2, resources: str | None = None) -> None:
        self.num_cpus = num_cpus
        self.resources = resources
        self._pick_ports()
        self.tmp = tempfile.mkdtemp(prefix="ray_")
        # Jobs run `python ...`: make that the interpreter (and virtualenv) running this code.
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            **LOOPBACK_RAY_ENV,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        }
        # Token authentication, as on a real cluster: `ray job submit` must present the token.
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    def _pick_ports(self) -> None:
        # every port of the head at once: distinct (see free_ports)
        self.port, self.dashboard_port, *self.component_ports = free_ports(7)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, **kw) -> subprocess.CompletedProcess:
        exe = str(Path(sys.executable).parent / "ray")
        return subprocess.run([exe, *args], env=self.env, text=True, capture_output=True, **kw)

    def __enter__(self) -> RayCluster:
        for _ in range(START_ATTEMPTS):
            out = self.ray(*self._start_args(), timeout=180)
            if out.returncode == 0:
                return self
            # Ray gives the raylet a fixed 30 s to register with the GCS, which a loaded 2-core
            # machine can miss (CI did): clear what this try left and start again on fresh ports.
            kill_processes_under(self.tmp)
            self._pick_ports()
        raise RuntimeError(f"ray start failed {START_ATTEMPTS} times:\n{out.stdout}\n{out.stderr}")

    def _start_args(self) -> list[str]:
        args = [
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.tmp}",
            "--disable-usage-stats",
            # fixed default ports would clash with any other Ray on the machine (tests, demo)
            *(
                f"--{name}={port}"
                for name, port in zip(
                    (
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "runtime-env-agent-port",
                        "metrics-export-port",
                        "ray-client-server-port",
                    ),
                    self.component_ports,
                    strict=True,
                )
            ),
        ]
        if self.resources:
            args.append(f"--resources={self.resources}")
        return args

    def submit(
        self, *entrypoint: str, working_dir: str = ".", env: dict | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir ... -- <entrypoint>`; waits for the job and returns."""
        runtime_env = {"env_vars": env} if env else None
        args = ["job", "submit", f"--address={self.dashboard}", f"--working-dir={working_dir}"]
        if runtime_env:
            import json

            args.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a little after `ray start` returns
            out = self.ray(*args, "--", *entrypoint, timeout=timeout)
            if "No available agent" not in out.stderr + out.stdout or time.monotonic() > deadline:
                return out
            time.sleep(2)

    def __exit__(self, *exc) -> None:
        # Not `ray stop`: that ends every Ray process on the machine, other clusters included.
        kill_processes_under(self.tmp)


def kill_processes_under(tmp_dir: str, *pids: int) -> None:
    """SIGKILL the processes `pids` and every Ray process started under `tmp_dir` (RAY_TMPDIR),
    with all their descendants (Ray workers rename themselves, so they are found as children)."""
    import psutil

    roots = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp_dir in arg for arg in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    victims = set(roots)
    for proc in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            victims.update(proc.children(recursive=True))
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(list(victims), timeout=10)
    shutil.rmtree(tmp_dir, ignore_errors=True)
