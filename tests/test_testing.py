"""The test harness itself (fmct_ray.testing): what the other tests stand on."""

import subprocess

from fmct_ray.testing import RayCluster


def test_a_head_that_misses_its_start_is_started_again_on_fresh_ports(monkeypatch, tmp_path):
    """CI once saw `ray start --head` time out (the raylet missed Ray's fixed 30 s to register on a
    loaded machine): the next try must get a running cluster on ports of its own."""
    real = RayCluster.ray
    starts = []

    def ray(self, *args, **kw):
        if args[0] == "start":
            starts.append(self.port)
            if len(starts) == 1:  # what `ray start` returns after the timeout
                return subprocess.CompletedProcess(args, 1, "", "timed out during startup")
        return real(self, *args, **kw)

    monkeypatch.setattr(RayCluster, "ray", ray)
    with RayCluster(num_cpus=1) as cluster:
        assert len(starts) == 2 and starts[0] != starts[1] == cluster.port
        job = cluster.submit("python", "-c", "print('ran on the head')", working_dir=str(tmp_path))
        assert job.returncode == 0 and "ran on the head" in job.stdout, job.stdout + job.stderr
