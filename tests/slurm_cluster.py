"""A one-host Slurm cluster for tests: Debian's slurmctld + 2 slurmd ("nodes" n1, n2 on 127.0.0.1,
one port each), auth/none, every state/spool/log/pid file under one temp folder, on free ports.
`make install` installs the packages (apt) where it can; `SlurmCluster.start` says what is missing."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol")

CONF = """\
ClusterName=vitpipe-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
{nodes}
PartitionName={partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


@dataclass
class SlurmCluster:
    directory: Path
    nodes: int = 2
    cpus: int = 2
    partition: str = "cpu"
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.directory / "slurm.conf")}

    def start(self, free_port, timeout: float = 30.0) -> "SlurmCluster":
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"Slurm is not installed here ({', '.join(missing)} missing): run `make install` as "
                               "root, or apt-get install slurmctld slurmd slurm-client")
        (self.directory / "state").mkdir(parents=True, exist_ok=True)
        names = [f"n{i + 1}" for i in range(self.nodes)]
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                          f"CPUs={self.cpus} State=UNKNOWN" for n in names)
        (self.directory / "slurm.conf").write_text(CONF.format(
            ctld_port=free_port(), dir=self.directory, nodes=nodes, names=",".join(names), partition=self.partition))
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld.out")
        for name in names:
            self._spawn(["slurmd", "-D", "-N", name], f"slurmd-{name}.out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.split() == ["idle", str(self.nodes)]:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle within {timeout:.0f}s: {self.logs()}")

    def _spawn(self, argv: list[str], log: str) -> None:
        with open(self.directory / log, "wb") as out:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.directory.glob("*.out")))

    def sbatch(self, script: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """Submit and wait for the job to end (`sbatch --wait`: its exit code is the job's)."""
        return subprocess.run(["sbatch", "--wait", *args, script], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the nodes first, then the controller
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
