import os
import pathlib
import shlex
import subprocess

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "tpu_scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_tpu_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"create.sh", "setup.sh", "run.sh", "sweep.sh", "delete.sh"} <= names


# ----------------------------------------------------------------------------- dry runs
# DRY_RUN=1 prints every gcloud command instead of running it. A fake `gcloud` first on PATH
# records every call, so the tests also prove that a dry run calls nothing; without DRY_RUN the
# same fake stands in for Cloud TPU (describe: N network endpoints; ssh: prints its worker and
# fails for $FAKE_FAIL_WORKER), so the real code path (one ssh per host, per-host logs, exit
# status) runs too. None of this has been run against real Cloud TPU hardware.


DIR = SCRIPTS[0].parent
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_GCLOUD_CALLS"
if [[ "$*" == *" describe "* ]]; then
  eps=""
  for ((i = 0; i < ${FAKE_WORKERS:-1}; i++)); do
    eps+="${eps:+,}{\\"ipAddress\\": \\"10.0.0.$i\\"}"
  done
  echo "{\\"networkEndpoints\\": [$eps]}"; exit 0
fi
if [[ "$*" == *" ssh "* ]]; then
  w=$(echo "$*" | sed -n 's/.*--worker=\\([0-9a-z]*\\).*/\\1/p')
  echo "fake ssh on worker $w"
  if [[ "$w" == "${FAKE_FAIL_WORKER:-none}" ]]; then echo "boom on $w"; exit 3; fi
fi
"""


@pytest.fixture()
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD)
    fake.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "ZONE", "NUM_WORKERS",
                                                          "DRY_RUN", "LOG_ROOT", "SCRIPT")}
    e.update(PATH=f"{bin_dir}:{e['PATH']}", LOG_ROOT=str(tmp_path / "logs"),
             FAKE_GCLOUD_CALLS=str(tmp_path / "gcloud_calls"))
    return e


def _run(env, script, *args, check=True, **extra):
    r = subprocess.run(["bash", str(DIR / script), *args], env={**env, **extra},
                       capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise AssertionError(f"{script} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _gcloud_calls(env) -> list[str]:
    p = pathlib.Path(env["FAKE_GCLOUD_CALLS"])
    return p.read_text().splitlines() if p.exists() else []


def _ssh(cmds):
    return [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


def _flag(cmd, name):
    for i, a in enumerate(cmd):
        if a == name:
            return cmd[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_dry_run_create_setup_delete_print_gcloud_and_call_nothing(env):
    out = _run(env, "create.sh", "dbp-1", "v5litepod-16", DRY_RUN="1", PROJECT="proj").stdout
    (create,) = _commands(out)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dbp-1"]
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--zone") == "us-west4-a" and _flag(create, "--project") == "proj"
    assert "--spot" in create and _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    setup = _commands(_run(env, "setup.sh", "dbp-1", "europe-west4-b", DRY_RUN="1").stdout)
    assert setup[0][:2] == ["git", "-C"] and "archive" in setup[0]
    assert [c[4] for c in setup[1:]] == ["scp", "ssh"]
    assert all(_flag(c, "--worker") == "all" and _flag(c, "--zone") == "europe-west4-b"
               for c in setup[1:])
    (delete,) = _commands(_run(env, "delete.sh", "dbp-1", DRY_RUN="1").stdout)
    assert delete[4:6] == ["delete", "dbp-1"] and "--quiet" in delete
    assert _gcloud_calls(env) == []


@pytest.mark.parametrize("workers", [1, 4], ids=["single_host", "pod_slice"])
def test_dry_run_run_sends_the_same_command_to_every_host(env, workers):
    cmd = "python experiments/robust_eval.py --config configs/x.py --workdir runs/x"
    out = _run(env, "run.sh", "dbp-1", cmd, DRY_RUN="1", NUM_WORKERS=str(workers)).stdout
    ssh = _ssh(_commands(out))
    assert [_flag(c, "--worker") for c in ssh] == [str(i) for i in range(workers)]
    remote = {_flag(c, "--command") for c in ssh}
    assert len(remote) == 1, "every host must run the same program"
    (remote,) = remote
    assert remote.endswith(cmd) and "JAXROB_DISTRIBUTED=1" in remote
    logs = [ln.split("> ", 1)[1] for ln in out.splitlines() if ln.startswith("#   > ")]
    assert len(set(logs)) == workers and all(log.endswith(f"worker-{i}.log")
                                             for i, log in enumerate(logs))
    assert _gcloud_calls(env) == []


def test_dry_run_without_num_workers_is_a_clear_error(env):
    r = _run(env, "run.sh", "dbp-1", "true", DRY_RUN="1", check=False)
    assert r.returncode != 0 and "NUM_WORKERS" in r.stderr
    assert _gcloud_calls(env) == []
    r = _run(env, "run.sh", "dbp-1", "true", DRY_RUN="1", NUM_WORKERS="two", check=False)
    assert r.returncode != 0 and "positive integer" in r.stderr


def test_dry_run_sweep_covers_every_point_and_resumes(env, tmp_path):
    args = ("dbp-1", "configs/mnist_ddpm.py", "train.lr=1e-4,2e-4", "train.batch_size=64,128")
    out = _run(env, "sweep.sh", *args, DRY_RUN="1", NUM_WORKERS="2").stdout
    ssh = _ssh(_commands(out))
    assert len(ssh) == 4 * 2
    per_point = [ssh[i:i + 2] for i in range(0, 8, 2)]
    workdirs = []
    for pair in per_point:
        assert [_flag(c, "--worker") for c in pair] == ["0", "1"]
        assert _flag(pair[0], "--command") == _flag(pair[1], "--command")
        remote = shlex.split(_flag(pair[0], "--command").split("&& ", 2)[-1])
        assert remote[:4] == ["python", "experiments/train_diffusion.py", "--config",
                              "configs/mnist_ddpm.py"]
        assert "if" not in remote  # no per-host decision: hosts must agree on what runs
        workdirs.append(_flag(remote, "--workdir"))
    assert len(set(workdirs)) == 4
    assert not (tmp_path / "logs" / "dbp-1" / "sweep").exists()  # a dry run records nothing
    # two points finished earlier: a rerun launches only the other two
    done = tmp_path / "logs" / "dbp-1" / "sweep" / "mnist_ddpm"
    done.mkdir(parents=True)
    for wd in workdirs[:2]:
        (done / f"{wd.rsplit('/', 1)[1]}.done").write_text("x")
    out = _run(env, "sweep.sh", *args, DRY_RUN="1", NUM_WORKERS="2").stdout
    remotes = {_flag(c, "--command") for c in _ssh(_commands(out))}
    assert len(remotes) == 2
    assert {r.split()[-1] for r in remotes} == set(workdirs[2:])
    assert out.count("done already") == 2
    assert _gcloud_calls(env) == []


def test_run_with_fake_gcloud_logs_per_host_and_reports_the_failed_worker(env, tmp_path):
    """Without DRY_RUN, against the fake gcloud: the hosts come from describe, one ssh each."""
    r = _run(env, "run.sh", "pod-1", "echo hi", FAKE_WORKERS="3")
    calls = _gcloud_calls(env)
    assert sum(" describe pod-1 " in c for c in calls) == 1
    assert sorted(c.split("--worker=")[1].split()[0] for c in calls if " ssh " in c) == \
        ["0", "1", "2"]
    (run_dir,) = (tmp_path / "logs" / "pod-1").iterdir()
    for i in range(3):
        assert (run_dir / f"worker-{i}.log").read_text().strip() == f"fake ssh on worker {i}"
    assert "finished on all 3" in r.stdout
    r = _run(env, "run.sh", "pod-1", "echo hi", FAKE_WORKERS="3", FAKE_FAIL_WORKER="1",
             check=False)
    assert r.returncode == 1 and "failed on worker(s) 1 of 3" in r.stderr
    assert "boom on 1" in r.stderr


def test_sweep_with_fake_gcloud_records_finished_points(env, tmp_path):
    args = ("pod-1", "configs/mnist_ddpm.py", "train.lr=1e-4,2e-4")
    _run(env, "sweep.sh", *args, NUM_WORKERS="2")
    done = sorted(p.name for p in (tmp_path / "logs" / "pod-1" / "sweep" / "mnist_ddpm")
                  .iterdir())
    assert done == ["train.lr=1e-4.done", "train.lr=2e-4.done"]
    n_ssh = sum(" ssh " in c for c in _gcloud_calls(env))
    out = _run(env, "sweep.sh", *args, NUM_WORKERS="2").stdout
    assert out.count("done already") == 2
    assert sum(" ssh " in c for c in _gcloud_calls(env)) == n_ssh == 4
