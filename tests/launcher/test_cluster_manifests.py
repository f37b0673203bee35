"""The cluster recipes under cluster/ parse, validate against their schemas, and run `sparsetrain train`
with a config that loads; the Slurm script is executed with stand-ins for srun/scontrol/ray."""
from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sparsetrain.launcher import hostip

from sparsetrain.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
EFA_PER_INSTANCE = {"p4d.24xlarge": 4, "p5.48xlarge": 32}


def _ray_pin() -> str:
    pins = dict(line.split("#")[0].strip().split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    return pins["ray"]


def _train_args(command: str) -> tuple[str, list[str]]:
    """(--config, [--set values]) of a `python -m sparsetrain.cli train ...` command line."""
    argv = shlex.split(command)
    i = argv.index("sparsetrain.cli")
    assert argv[i - 2:i + 2] == ["python", "-m", "sparsetrain.cli", "train"], argv
    config, sets, rest = "tiny", [], argv[i + 2:]
    for flag, value in zip(rest[::2], rest[1::2]):
        assert flag in ("--config", "--set"), f"unexpected argument {flag}"
        if flag == "--config":
            config = value
        else:
            sets.append(value)
    return config, sets


def test_ray_cluster_yaml_validates_against_ray_schema_with_efa_and_pinned_installs():
    pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    import json

    import ray.autoscaler

    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{_ray_pin()}-")
    gpu_types = 0
    for name, node in cfg["available_node_types"].items():
        itype = node["node_config"]["InstanceType"]
        if itype not in EFA_PER_INSTANCE:
            continue
        gpu_types += 1
        nics = node["node_config"]["NetworkInterfaces"]
        assert len(nics) == EFA_PER_INSTANCE[itype], name
        assert all(n["InterfaceType"] == "efa" for n in nics)
        assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(len(nics)))
        assert [n["NetworkCardIndex"] for n in nics if n["DeviceIndex"] == 0] == [0]
        # Ray's AWS provider: with NetworkInterfaces, subnet and groups only on (and on every) interface
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(node["node_config"])
        assert all(n["SubnetId"] and n["Groups"] for n in nics)
    assert gpu_types == 2
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "FI_PROVIDER=efa" in worker_start and "/opt/amazon/ofi-nccl/lib" in worker_start
    assert any("efa_installer.sh" in c for c in cfg["worker_setup_commands"])
    assert "--device=/dev/infiniband" in cfg["docker"]["worker_run_options"]
    installs = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert installs and all(" -c " in c and "constraints.txt" in c for c in installs)
    mounts = [o.split()[1].split(":")[0] for o in cfg["docker"]["run_options"] if o.startswith("-v ")]
    init = " ".join(cfg.get("initialization_commands", []))
    for host_dir in mounts:  # whatever the containers mount, the hosts provide
        assert re.search(rf"mount .*{re.escape(host_dir)}\b", init), f"nothing mounts {host_dir} on the hosts"
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token" in cmd


def test_rayjob_uses_operator_token_auth_and_runs_a_loadable_config():
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    header = (CLUSTER / "kuberay" / "rayjob.yaml").read_text()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    rc = spec["rayClusterSpec"]
    assert rc["authOptions"] == {"mode": "token"}
    assert "KubeRay operator >= v1.5.1" in header
    assert tuple(map(int, rc["rayVersion"].split("."))) >= (2, 52, 0) and rc["rayVersion"] == _ray_pin()
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert not any(e["name"].startswith("RAY_AUTH") for c in containers for e in c.get("env", []))
    config, sets = _train_args(spec["entrypoint"])
    cfg = load_config(config, sets)
    assert cfg.launch.address == "auto"
    gpus = sum(int(g["replicas"]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in rc["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert cfg.launch.workers * cfg.launch.gpus_per_worker == gpus
    assert os.path.isabs(cfg.train.out_dir) and os.path.isabs(cfg.data.corpus)
    for g in groups:  # out_dir and data lie on a volume every pod mounts
        mounts = [m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(cfg.train.out_dir.startswith(m + "/") and cfg.data.corpus.startswith(m + "/") for m in mounts)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{rc['rayVersion']}-" in dockerfile
    assert re.search(r"pip install .*-c constraints\.txt", dockerfile)


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_starts_a_reachable_head_and_the_trainer(tmp_path):
    bin_, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_.mkdir()
    _shim(bin_ / "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    _shim(bin_ / "srun", 'while [[ "$1" == -* ]]; do [[ "$1" == -w ]] && shift; shift; done; exec "$@"\n')
    _shim(bin_ / "ray", f'echo "ray $*" >> {log}\n')
    _shim(bin_ / "python", f'if [[ "$1 $2" == "-m sparsetrain.launcher.hostip" ]]; then echo "hostip $3" >> {log}; '
                           f'echo 10.1.2.3; exit 0; fi\n'
                           f'if [[ "$1 $2" == "-m sparsetrain.cli" ]]; then echo "python $*" >> {log}; sleep 2; exit 0; fi\n'
                           f'exec {sys.executable} "$@"\n')
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "VENV": str(venv), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_CPUS_PER_TASK": "8"}
    user = ["--config", "gpt-moe-s", "--set", "data.corpus=/shared/owt", "--set", "train.out_dir=/shared/runs/s"]
    out = subprocess.run(["bash", str(CLUSTER / "slurm" / "sparsetrain.sbatch"), *user], check=False, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()  # (the worker steps ran while the trainer stand-in slept)
    assert "hostip gpu-b" in calls  # the head's address is the one that routes to the other node
    head = next(c for c in calls if c.startswith("ray start --head"))
    assert "--node-ip-address=10.1.2.3" in head and "--include-dashboard=true" in head
    assert "--dashboard-host=10.1.2.3" in head
    assert any(c.startswith("ray start --block --address=10.1.2.3:6379") for c in calls)
    assert "submit --address http://10.1.2.3:8265" in out.stdout
    train = next(c for c in calls if c.startswith("python -m sparsetrain.cli"))
    config, sets = _train_args(train)
    cfg = load_config(config, sets)
    assert (cfg.launch.address, cfg.launch.workers, cfg.train.out_dir) == ("10.1.2.3:6379", 16, "/shared/runs/s")
    assert not (tmp_path / ".ray" / "slurm-77.token").exists()  # removed when the job ends


def test_host_ip_never_returns_loopback(monkeypatch):
    monkeypatch.setattr(hostip, "source_ip_towards", lambda peer: "127.0.1.1")
    monkeypatch.setattr(hostip.socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("127.0.1.1", 0))])
    with pytest.raises(RuntimeError, match="no routable IPv4 address.*set HEAD_IP"):
        hostip.host_ip("gpu-b")
    monkeypatch.setattr(hostip.socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("127.0.1.1", 0)),
                                                                       (2, 1, 6, "", ("10.0.0.7", 0))])
    assert hostip.host_ip("gpu-b") == "10.0.0.7"
    monkeypatch.setattr(hostip, "source_ip_towards", lambda peer: "10.9.9.9")
    assert hostip.host_ip("gpu-b") == "10.9.9.9"
