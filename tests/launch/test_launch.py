"""launch/*.sh: the exact --dry-run output, that a run without --dry-run executes those same
commands (against stand-in gcloud/git/sbatch/python that record their arguments), the errors,
and that the commands in docs/launch.md are the tested ones. Runs bash only, no JAX."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "launch.md"
DOC_ROOT = "/path/to/magnet_jax"  # how docs/launch.md writes this checkout's path

TPU_RUN_PREFIX = "gcloud compute tpus tpu-vm ssh tpu1 --zone z1 --worker=all --command "
TPU_INSTALL_COMMAND = (
    "{ python3.11 -m venv ~/magnet_venv || { sudo apt-get update -q && sudo apt-get install -y -q "
    "python3.11 python3.11-venv && python3.11 -m venv --clear ~/magnet_venv; }; } "
    "&& ~/magnet_venv/bin/pip install -q --upgrade pip "
    '&& ~/magnet_venv/bin/pip install -q -r ~/magnet_jax/requirements.txt "jax[tpu]"'
)


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "launch" / script), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env, timeout=60)


def dry_run(script: str, *args: str) -> list[str]:
    """The printed commands, with this checkout's path written as in the docs."""
    result = launch(script, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.replace(str(REPO_ROOT), DOC_ROOT).splitlines()


def remote_command(line: str) -> str:
    """The --command argument of a printed `gcloud ... ssh` line."""
    argv = shlex.split(line)
    return argv[argv.index("--command") + 1]


def batch_script(lines: list[str]) -> list[str]:
    assert lines[0] == "sbatch <<'MAGNET_JAX_SBATCH'" and lines[-1] == "MAGNET_JAX_SBATCH"
    return lines[1:-1]


# --------------------------------------------------------------------------------------------
# Stand-in tools: each records its name, arguments, working directory, CUDA_VISIBLE_DEVICES,
# JAX_LOCAL_DEVICE_IDS and (sbatch) standard input as one JSON line.
# --------------------------------------------------------------------------------------------

RECORDER = """#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
record = {{"argv": [name] + sys.argv[1:], "cwd": os.getcwd(),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}}
if name == "sbatch":
    record["stdin"] = sys.stdin.read()
with open(os.environ["RECORD_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
# `tpu-vm describe` fails unless told otherwise: the TPU VM does not exist yet.
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "describe"]:
    sys.exit(int(os.environ.get("DESCRIBE_STATUS", "1")))
"""


class Recorder:
    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.log = root / "record.jsonl"
        self.bin.mkdir()

    def tool(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
        return path

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, RECORD_LOG=str(self.log), **extra)
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}"
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.pop("JAX_LOCAL_DEVICE_IDS", None)
        return env

    def take(self) -> list[dict]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return records


@pytest.fixture
def recorder(tmp_path) -> Recorder:
    rec = Recorder(tmp_path)
    for name in ("gcloud", "git", "sbatch", "srun"):
        rec.tool(rec.bin / name)
    return rec


def assert_printed_equals_executed(recorder: Recorder, script: str, *args: str,
                                   **env: str) -> list[dict]:
    """Pasting the --dry-run output into bash and running the script without --dry-run give
    the same tool invocations; returns them."""
    printed = launch(script, "--dry-run", *args).stdout
    pasted = subprocess.run(["bash", "-euo", "pipefail", "-c", printed], cwd=REPO_ROOT,
                            env=recorder.env(**env), capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, pasted.stderr
    from_paste = recorder.take()
    executed = launch(script, *args, env=recorder.env(**env))
    assert executed.returncode == 0, executed.stderr
    from_run = recorder.take()
    assert from_run == from_paste
    assert from_run
    return from_run


# --------------------------------------------------------------------------------------------
# launch/tpu_pod.sh
# --------------------------------------------------------------------------------------------

def test_tpu_create_copy_install_run():
    lines = dry_run("tpu_pod.sh", "--name", "tpu1", "--zone", "z1", "--type", "v4-16",
                    "--version", "tpu-ubuntu2204-base", "--workdir", "/shared/run",
                    "--", "train", "--config", "configs/synthetic.py")
    assert lines == [
        "gcloud compute tpus tpu-vm describe tpu1 --zone z1 >/dev/null 2>&1 || "
        "gcloud compute tpus tpu-vm create tpu1 --zone z1 --accelerator-type v4-16 "
        "--version tpu-ubuntu2204-base",
        f"git -C {DOC_ROOT} archive --format=tar.gz --output=/tmp/magnet_jax-tpu1.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/magnet_jax-tpu1.tar.gz tpu1:magnet_jax.tar.gz "
        "--zone z1 --worker=all",
        TPU_RUN_PREFIX + "'rm -rf ~/magnet_jax && mkdir -p ~/magnet_jax "
        "&& tar -xzf ~/magnet_jax.tar.gz -C ~/magnet_jax'",
        TPU_RUN_PREFIX + shlex.quote(TPU_INSTALL_COMMAND),
        TPU_RUN_PREFIX + "'cd ~/magnet_jax && ~/magnet_venv/bin/python -m magnet_jax.train "
        "--distributed --config configs/synthetic.py --workdir /shared/run'",
    ]


def test_tpu_skips_clone_project_and_evaluate():
    lines = dry_run("tpu_pod.sh", "--name", "tpu1", "--zone", "z1", "--project", "proj",
                    "--skip-create", "--skip-install", "--repo", "https://example.com/m.git",
                    "--ref", "v1.0", "--data", "/data/refcoco_unc",
                    "--", "evaluate", "--checkpoint", "/shared/run", "--split", "testA")
    prefix = "gcloud compute tpus tpu-vm ssh tpu1 --zone z1 --project proj --worker=all --command "
    assert lines == [
        prefix + "'rm -rf ~/magnet_jax && git clone --quiet https://example.com/m.git "
        "~/magnet_jax && git -C ~/magnet_jax checkout --quiet v1.0'",
        prefix + "'cd ~/magnet_jax && ~/magnet_venv/bin/python -m magnet_jax.evaluate "
        "--distributed --checkpoint /shared/run --split testA --data /data/refcoco_unc'",
    ]


def test_tpu_run_only_and_create_args():
    lines = dry_run("tpu_pod.sh", "--name=tpu1", "--zone=z1", "--skip-create", "--skip-copy",
                    "--skip-install", "--workdir=/shared/run", "--data=/data/d",
                    "--", "train", "--config", "configs/refcoco.py")
    assert lines == [
        TPU_RUN_PREFIX + "'cd ~/magnet_jax && ~/magnet_venv/bin/python -m magnet_jax.train "
        "--distributed --config configs/refcoco.py --workdir /shared/run "
        "--config.data.dir /data/d'"
    ]
    lines = dry_run("tpu_pod.sh", "--name", "tpu1", "--zone", "z1", "--type", "v5p-8",
                    "--version", "v2-alpha-tpuv5", "--create-arg=--spot", "--skip-copy",
                    "--skip-install", "--workdir", "/w", "--", "train")
    assert lines[0].endswith(" --version v2-alpha-tpuv5 --spot")
    assert len(lines) == 2


def test_tpu_remote_commands_are_bash_and_keep_arguments(recorder, tmp_path):
    odd = "/shared/weights/swin b's.pth"
    lines = dry_run("tpu_pod.sh", "--name", "tpu1", "--zone", "z1", "--skip-create",
                    "--workdir", "/shared/run", "--", "train", "--config.init.swin", odd)
    remotes = [remote_command(line) for line in lines if " ssh " in line]
    assert len(remotes) == 3
    for remote in remotes:
        subprocess.run(["bash", "-n", "-c", remote], check=True)
    # The run command on a stand-in worker: home with the code directory and the venv.
    home = tmp_path / "home"
    (home / "magnet_jax").mkdir(parents=True)
    recorder.tool(home / "magnet_venv" / "bin" / "python")
    subprocess.run(["bash", "-c", remotes[-1]], env=recorder.env(HOME=str(home)), check=True)
    [record] = recorder.take()
    assert record["argv"] == ["python", "-m", "magnet_jax.train", "--distributed",
                              "--config.init.swin", odd, "--workdir", "/shared/run"]
    assert record["cwd"] == str(home / "magnet_jax")


@pytest.mark.parametrize("describe_status", ["0", "1"])
def test_tpu_printed_commands_are_the_executed_ones(recorder, describe_status):
    records = assert_printed_equals_executed(
        recorder, "tpu_pod.sh", "--name", "tpu1", "--zone", "z1", "--type", "v4-8",
        "--version", "tpu-ubuntu2204-base", "--workdir", "/shared/run",
        "--", "train", "--config", "configs/synthetic.py", DESCRIBE_STATUS=describe_status)
    verbs = [" ".join(r["argv"][:5]) if r["argv"][0] == "gcloud" else r["argv"][0]
             for r in records]
    created = ["gcloud compute tpus tpu-vm create"] if describe_status == "1" else []
    assert verbs == ["gcloud compute tpus tpu-vm describe", *created, "git",
                     "gcloud compute tpus tpu-vm scp", *["gcloud compute tpus tpu-vm ssh"] * 3]


# --------------------------------------------------------------------------------------------
# launch/gpu_host.sh
# --------------------------------------------------------------------------------------------

def test_gpu_host_install_and_run():
    # The expected lines are the docs' example output (DOC_COMMAND_OUTPUT, below).
    assert dry_run("gpu_host.sh", "--install", "--", "train", "--config",
                   "configs/synthetic.py", "--workdir", "runs/synthetic") == DOC_COMMAND_OUTPUT[
        "launch/gpu_host.sh --install -- train --config configs/synthetic.py "
        "--workdir runs/synthetic"]


def test_gpu_host_evaluate_options():
    assert dry_run("gpu_host.sh", "--venv", "/opt/env", "--install", "--cuda", "cuda13",
                   "--python", "python3.12", "--gpus", "2,3", "--data", "records/r",
                   "--", "evaluate", "--checkpoint", "runs/x", "--split", "val") == [
        f"cd {DOC_ROOT}",
        "python3.12 -m venv /opt/env",
        "/opt/env/bin/pip install --upgrade pip",
        "/opt/env/bin/pip install -r requirements.txt 'jax[cuda13]'",
        "env CUDA_VISIBLE_DEVICES=2,3 /opt/env/bin/python -m magnet_jax.evaluate "
        "--checkpoint runs/x --split val --data records/r",
    ]


def test_gpu_host_printed_commands_are_the_executed_ones(recorder):
    venv = recorder.root / "venv"
    recorder.tool(venv / "bin" / "python")
    recorder.tool(venv / "bin" / "pip")
    python = recorder.tool(recorder.root / "python3-stand-in")
    records = assert_printed_equals_executed(
        recorder, "gpu_host.sh", "--venv", str(venv), "--install", "--python", str(python),
        "--gpus", "0,1", "--", "train", "--config", "configs/synthetic.py")
    assert [r["argv"][0] for r in records] == ["python3-stand-in", "pip", "pip", "python"]
    assert records[-1]["argv"][1:] == ["-m", "magnet_jax.train", "--config",
                                       "configs/synthetic.py"]
    assert records[-1]["cwd"] == str(REPO_ROOT)
    assert records[-1]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert records[0]["CUDA_VISIBLE_DEVICES"] is None


# --------------------------------------------------------------------------------------------
# launch/slurm.sh
# --------------------------------------------------------------------------------------------

def test_slurm_per_host_with_all_options():
    lines = dry_run("slurm.sh", "--nodes", "3", "--gpus-per-node", "4", "--per", "host",
                    "--partition", "a100", "--time", "12:00:00", "--account", "acct",
                    "--job-name", "rc", "--cpus-per-task", "16", "--output", "logs/%j.out",
                    "--sbatch-arg=--qos=high", "--sbatch-arg", "--exclusive",
                    "--venv", "/shared/env", "--workdir", "runs/r", "--data", "records/d",
                    "--", "train", "--config", "configs/refcocog_umd.py")
    assert batch_script(lines) == [
        "#!/bin/bash",
        "#SBATCH --job-name=rc",
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --partition=a100",
        "#SBATCH --time=12:00:00",
        "#SBATCH --account=acct",
        "#SBATCH --output=logs/%j.out",
        f"#SBATCH --chdir={DOC_ROOT}",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
        "set -euo pipefail",
        "# One process per node: without this, jax.distributed.initialize() would restrict the",
        "# process to GPU $SLURM_LOCALID, i.e. GPU 0.",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
        "srun --cpus-per-task=16 /shared/env/bin/python -m magnet_jax.train --distributed "
        "--config configs/refcocog_umd.py --workdir runs/r --config.data.dir records/d",
    ]


def test_slurm_per_gpu_evaluate():
    script = batch_script(dry_run("slurm.sh", "--nodes", "1", "--gpus-per-node", "2", "--",
                                  "evaluate", "--checkpoint", "runs/r", "--split", "val"))
    assert [line for line in script if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=magnet_jax",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --output=slurm-%x-%j.out",
        f"#SBATCH --chdir={DOC_ROOT}",
    ]
    assert not any("JAX_LOCAL_DEVICE_IDS" in line or "gpus-per-task" in line.split("#")[0]
                   for line in script)
    assert script[-1] == ("srun .venv/bin/python -m magnet_jax.evaluate --distributed "
                          "--checkpoint runs/r --split val")


@pytest.mark.parametrize("per, device_ids", [("gpu", None), ("host", "0,1,2")])
def test_slurm_submitted_script_runs_srun(recorder, per, device_ids):
    [submitted] = assert_printed_equals_executed(
        recorder, "slurm.sh", "--nodes", "2", "--gpus-per-node", "3", "--per", per,
        "--", "train", "--config.init.bert", "weights/a b")
    assert submitted["argv"] == ["sbatch"]
    script = submitted["stdin"]
    printed = launch("slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "3",
                     "--per", per, "--", "train", "--config.init.bert", "weights/a b").stdout
    assert script.splitlines() == printed.splitlines()[1:-1]
    # The batch script itself, run by bash: srun gets the arguments intact.
    subprocess.run(["bash", "-c", script], env=recorder.env(), check=True, cwd=recorder.root)
    [srun] = recorder.take()
    assert srun["argv"] == ["srun", ".venv/bin/python", "-m", "magnet_jax.train",
                            "--distributed", "--config.init.bert", "weights/a b"]
    assert srun["JAX_LOCAL_DEVICE_IDS"] == device_ids


# --------------------------------------------------------------------------------------------
# Help and errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_host.sh", "slurm.sh"])
def test_help(script):
    result = launch(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: launch/{script} ")
    assert "--dry-run" in result.stdout


TPU_OK = ["--name", "t", "--zone", "z", "--skip-create"]


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", ["--zone", "z", "--skip-create", "--", "evaluate"], "missing --name"),
    ("tpu_pod.sh", ["--name", "t", "--skip-create", "--", "evaluate"], "missing --zone"),
    ("tpu_pod.sh", ["--name", "t", "--zone", "z", "--", "evaluate"], "missing --type"),
    ("tpu_pod.sh", ["--name", "t", "--zone", "z", "--type", "v4-8", "--", "evaluate"],
     "missing --version"),
    ("tpu_pod.sh", ["--name", "--zone", "z"], "--name needs a value, got option --zone"),
    ("tpu_pod.sh", [*TPU_OK, "--zone"], "--zone needs a value"),
    ("tpu_pod.sh", [*TPU_OK, "--worker", "all"], "unknown option --worker"),
    ("tpu_pod.sh", TPU_OK, "missing -- train|evaluate"),
    ("tpu_pod.sh", [*TPU_OK, "--"], "nothing after --"),
    ("tpu_pod.sh", [*TPU_OK, "--", "predict"], "unknown command 'predict' after --"),
    ("tpu_pod.sh", [*TPU_OK, "--", "train"], "train needs --workdir"),
    ("tpu_pod.sh", [*TPU_OK, "--workdir", "runs/x", "--", "train"],
     "--workdir must be an absolute path"),
    ("tpu_pod.sh", [*TPU_OK, "--workdir", "/w", "--data", "records", "--", "train"],
     "--data must be an absolute path"),
    ("tpu_pod.sh", [*TPU_OK, "--", "train", "--workdir=/w"], "pass --workdir to the launcher"),
    ("tpu_pod.sh", [*TPU_OK, "--workdir", "/w", "--", "evaluate"], "--workdir is a train option"),
    ("gpu_host.sh", [], "missing -- train|evaluate"),
    ("gpu_host.sh", ["--", "train", "--dry-run"], "--dry-run must come before --"),
    ("gpu_host.sh", ["--gpu", "0", "--", "train"], "unknown option --gpu"),
    ("gpu_host.sh", ["--gpus", "all", "--", "train"], "--gpus takes GPU indices"),
    ("gpu_host.sh", ["--cuda", "cuda11", "--", "train"], "--cuda must be cuda12 or cuda13"),
    ("gpu_host.sh", ["--workdir", "w", "--", "evaluate"], "--workdir is a train option"),
    ("slurm.sh", ["--gpus-per-node", "8", "--", "train"], "missing --nodes"),
    ("slurm.sh", ["--nodes", "2", "--", "train"], "missing --gpus-per-node"),
    ("slurm.sh", ["--nodes", "0", "--gpus-per-node", "8", "--", "train"],
     "--nodes must be a positive integer"),
    ("slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--per", "node", "--", "train"],
     "--per must be gpu or host"),
    ("slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "x", "--",
                  "train"], "--cpus-per-task must be a positive integer"),
    ("slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--", "train", "--x=a\nb"],
     "must not contain newlines"),
    ("slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--ntasks", "3"],
     "unknown option --ntasks"),
])
def test_errors(script, args, message):
    result = launch(script, "--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"launch/{script}: error: ")
    assert message in line


# --------------------------------------------------------------------------------------------
# docs/launch.md: its commands are these, and its printed output is the scripts' output.
# --------------------------------------------------------------------------------------------

# The output of the docs' commands that no `console` block there shows.
DOC_COMMAND_OUTPUT = {
    "launch/tpu_pod.sh --name magnet-v5e --zone us-west4-a --skip-create --skip-copy "
    "--skip-install --data /mnt/shared/records/refcoco_unc -- evaluate --checkpoint "
    "/mnt/shared/runs/refcoco --split testA": [
        "gcloud compute tpus tpu-vm ssh magnet-v5e --zone us-west4-a --worker=all --command "
        "'cd ~/magnet_jax && ~/magnet_venv/bin/python -m magnet_jax.evaluate --distributed "
        "--checkpoint /mnt/shared/runs/refcoco --split testA "
        "--data /mnt/shared/records/refcoco_unc'",
    ],
    "launch/gpu_host.sh --install -- train --config configs/synthetic.py "
    "--workdir runs/synthetic": [
        f"cd {DOC_ROOT}",
        "python3 -m venv .venv",
        ".venv/bin/pip install --upgrade pip",
        ".venv/bin/pip install -r requirements.txt 'jax[cuda12]'",
        ".venv/bin/python -m magnet_jax.train --config configs/synthetic.py "
        "--workdir runs/synthetic",
    ],
    "launch/gpu_host.sh -- evaluate --checkpoint runs/refcoco --split val "
    "--out runs/refcoco/val.json": [
        f"cd {DOC_ROOT}",
        ".venv/bin/python -m magnet_jax.evaluate --checkpoint runs/refcoco --split val "
        "--out runs/refcoco/val.json",
    ],
    "launch/slurm.sh --nodes 4 --gpus-per-node 4 --per host --account my-project "
    "--cpus-per-task 32 --workdir runs/refcoco --data records/refcoco_unc "
    "-- train --config configs/refcoco.py": [
        "sbatch <<'MAGNET_JAX_SBATCH'",
        "#!/bin/bash",
        "#SBATCH --job-name=magnet_jax",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --account=my-project",
        "#SBATCH --output=slurm-%x-%j.out",
        f"#SBATCH --chdir={DOC_ROOT}",
        "set -euo pipefail",
        "# One process per node: without this, jax.distributed.initialize() would restrict the",
        "# process to GPU $SLURM_LOCALID, i.e. GPU 0.",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
        "srun --cpus-per-task=32 .venv/bin/python -m magnet_jax.train --distributed "
        "--config configs/refcoco.py --workdir runs/refcoco --config.data.dir records/refcoco_unc",
        "MAGNET_JAX_SBATCH",
    ],
}


def _doc_blocks(language: str) -> list[list[str]]:
    text = DOCS.read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)
    return [block.splitlines() for block in blocks]


def _join_continuations(lines: list[str]) -> tuple[list[str], list[str]]:
    """The first logical line (`\\` continuations joined) and the lines after it."""
    parts = []
    for i, line in enumerate(lines):
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
        else:
            parts.append(line.strip())
            return [" ".join(parts)], lines[i + 1:]
    raise AssertionError(f"unterminated command: {lines}")


def doc_commands() -> list[list[str]]:
    """argv of every command in the docs' bash blocks."""
    commands = []
    for block in _doc_blocks("bash"):
        while block:
            [command], block = _join_continuations(block)
            commands.append(shlex.split(command))
    return commands


def doc_console_examples() -> list[tuple[list[str], list[str]]]:
    """(argv, printed lines) of every console block: `$ command` then its output."""
    examples = []
    for block in _doc_blocks("console"):
        assert block[0].startswith("$ ")
        [command], output = _join_continuations([block[0][2:], *block[1:]])
        examples.append((shlex.split(command), output))
    return examples


def _without_dry_run(argv: list[str]) -> list[str]:
    return [arg for arg in argv if arg != "--dry-run"]


def test_docs_commands_are_the_tested_ones():
    commands = doc_commands()
    assert commands and all(argv[0].startswith("launch/") for argv in commands)
    shown = [_without_dry_run(argv) for argv, _ in doc_console_examples()]
    listed = [shlex.split(command) for command in DOC_COMMAND_OUTPUT]
    assert sorted(commands) == sorted(shown + listed)


@pytest.mark.parametrize("command", DOC_COMMAND_OUTPUT)
def test_docs_command_output(command):
    script, *args = shlex.split(command)
    assert dry_run(Path(script).name, *args) == DOC_COMMAND_OUTPUT[command]


def test_docs_console_output():
    examples = doc_console_examples()
    assert len(examples) == 3
    for argv, output in examples:
        assert "--dry-run" in argv
        script, *args = _without_dry_run(argv)
        assert dry_run(Path(script).name, *args) == output
