"""The shape of a launch, checked before anything starts: how many nodes and ranks per node,
from the flags a user passes (`--nnodes`, `--nproc`, `--hostfile`, `--no-ssh --node-rank
--master-addr`), and the run config's data layout fitted to that world size.

A launch is never silently another size than asked: `launch_overrides` either turns the flags
into `launch.*` settings that name the whole cluster, or raises `ClusterError` with one line
naming the flag and the fix. `fit_layout` derives what depends on the world size W:

* micro-batch: the largest divisor of the per-rank batch (global / W) not above the config's
  `batch.micro_batch_size` (that value is a memory cap), so accumulation = per-rank / micro;
* lanes (vit/data.py): `data.lanes = 0` derives W x workers (fewer workers if that would not
  divide the global batch); lanes a config pins must be a multiple of W dividing the global batch;
* workers: `data.num_workers = null` (the paper presets) derives the decode workers per rank from the
  node (`data_workers`: cores per node / ranks per node, less one core for each rank's own process;
  `launch.cores_per_node = 0` counts the cores this launcher may use); a number pins it. At most
  lanes / W either way (a worker reads whole lanes).

Lanes are part of a checkpoint's data position: a run resumed on another world size keeps its
lanes (pass `--set data.lanes=N` with the checkpoint's value when derived lanes would differ).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vit.config import ConfigError

# the cluster sizes every preset is checked at (tests/test_cluster.py)
WORLD_SIZES = (1, 2, 8, 16, 32, 64, 256)


class ClusterError(ConfigError):
    """A cluster shape or data layout that cannot run as asked; one line naming the flag or key and the fix."""


def hostfile_nodes(path: str) -> list[tuple[str, int]]:
    """(host, slots) per line of an MPI-style hostfile; one-line errors for a missing file or bad lines."""
    import re

    if not os.path.isfile(path):
        raise ClusterError(f"hostfile {path} does not exist; write one 'HOST slots=N' line per node (deploy/hostfile.example)")
    nodes = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m:
            raise ClusterError(f"{path}:{i}: expected 'HOST slots=N', got {line!r}")
        nodes.append((m.group(1), int(m.group(2))))
    if not nodes:
        raise ClusterError(f"{path}: no hosts; write one 'HOST slots=N' line per node")
    return nodes


def launch_overrides(*, nnodes: int | None = None, nproc: int | None = None, hostfile: str | None = None,
                     no_ssh: bool = False, node_rank: int | None = None, master_addr: str | None = None,
                     check_only: bool = False) -> list[str]:
    """`launch.*=value` overrides for the cluster the flags describe, or ClusterError.

    Forms: one node (no flags); `--hostfile H` (this launcher starts every node, over ssh / pdsh /
    mpi); `--no-ssh --nnodes N --node-rank I --master-addr A` (one launcher per node; or
    `--hostfile H` instead of `--nnodes N`). `check_only` (`--check`): `--nnodes N` alone names the size.
    """
    for flag, value in (("--nnodes", nnodes), ("--nproc", nproc)):
        if value is not None and value < 1:
            raise ClusterError(f"{flag} {value}: must be >= 1")
    if node_rank is not None and not no_ssh:
        raise ClusterError("--node-rank is for one launcher per node: add --no-ssh (and --master-addr), or drop --node-rank")
    if no_ssh and (node_rank is None or master_addr is None):
        raise ClusterError("--no-ssh starts only this node's ranks: pass --node-rank I (this node) and --master-addr A "
                           "(node 0's address)")
    items: list[str] = []
    if hostfile:
        nodes = hostfile_nodes(hostfile)
        if nnodes is not None and nnodes != len(nodes):
            raise ClusterError(f"--nnodes {nnodes} but hostfile {hostfile} lists {len(nodes)} nodes; make them agree")
        if nproc is None:
            slots = sorted({s for _, s in nodes})
            if len(slots) > 1:
                raise ClusterError(f"hostfile {hostfile} lists different slots per node ({slots}); pass --nproc N "
                                   "(ranks on every node)")
            nproc = slots[0]
        short = [(h, s) for h, s in nodes if s < nproc]
        if short:
            host, slots = short[0]
            raise ClusterError(f"hostfile {hostfile}: host {host} has slots={slots} but --nproc {nproc} asks for {nproc} "
                               f"ranks per node; raise its slots to {nproc} or pass --nproc {slots}")
        nnodes = len(nodes)
        items.append(f"launch.hostfile={json.dumps(os.path.abspath(hostfile))}")
    elif no_ssh and nnodes is None:
        raise ClusterError("--no-ssh without --hostfile needs --nnodes N (the number of nodes), else this node "
                           "would train alone as a job of its own")
    elif (nnodes or 1) > 1 and not no_ssh and not check_only:
        raise ClusterError(f"--nnodes {nnodes} needs the other nodes: pass --hostfile H (start them all from here) or "
                           "run --no-ssh --node-rank I --master-addr A on each node")
    nnodes = nnodes or 1
    if no_ssh and not 0 <= node_rank < nnodes:
        raise ClusterError(f"--node-rank {node_rank} is outside the {nnodes} nodes; use 0..{nnodes - 1}")
    items.append(f"launch.num_nodes={nnodes}")
    if nproc is not None:
        items.append(f"launch.nproc_per_node={nproc}")
    return items


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def data_workers(*, cores_per_node: int, ranks_per_node: int) -> int:
    """Decode workers per rank that keep a node's cores busy: each rank's own process (the training
    step, batch assembly, the copy to the GPU) takes one core, its workers share the rest; at least 1."""
    return max(1, cores_per_node // ranks_per_node - 1)


def fit_layout(data: dict) -> dict:
    """Fit a run config dict's batch and data layout to its world size, in place; return what was set.

    Raises ClusterError when the global batch does not split over the ranks or pinned lanes do not fit.
    """
    launch, batch, dcfg = data["launch"], data["batch"], data["data"]
    nodes, nproc = launch["num_nodes"], launch["nproc_per_node"]
    world = nodes * nproc
    g = batch["global_batch_size"]
    if g % world:
        bigger = -(-g // world) * world
        raise ClusterError(f"batch.global_batch_size={g} does not split over {world} ranks ({nodes} nodes x {nproc}); "
                           f"pass --set batch.global_batch_size={bigger} (a multiple of {world}) or use fewer ranks")
    local = g // world
    workers = dcfg["num_workers"]
    if workers is None:  # derived from the node: cores per node and ranks per node
        from shards.workers import usable_cores

        launch["cores_per_node"] = launch.get("cores_per_node") or usable_cores()
        workers = data_workers(cores_per_node=launch["cores_per_node"], ranks_per_node=nproc)
    lanes = dcfg["lanes"]
    if lanes == 0:  # derived: one lane per worker per rank, fewer workers if W x workers would not divide g
        per_rank = max(1, workers)
        while per_rank > 1 and g % (world * per_rank):
            per_rank -= 1
        lanes = world * per_rank
    elif lanes % world or g % lanes:
        fits = [n for n in range(world, g + 1, world) if g % n == 0]  # world divides g (checked above)
        fit = min(fits, key=lambda n: (abs(n - lanes), n))
        raise ClusterError(f"data.lanes={lanes} must be a multiple of the {world} ranks that divides "
                           f"batch.global_batch_size={g}; pass --set data.lanes={fit}, or --set data.lanes=0 to derive it")
    micro = _largest_divisor(local, batch["micro_batch_size"])
    fitted = {"world_size": world, "data.lanes": lanes, "data.num_workers": min(workers, lanes // world),
              "batch.micro_batch_size": micro, "grad_accum": local // micro}
    dcfg["lanes"], dcfg["num_workers"], batch["micro_batch_size"] = lanes, fitted["data.num_workers"], micro
    return fitted


def layout_line(cfg) -> str:
    """One line describing a RunConfig's cluster and data layout."""
    lc = cfg.launch
    return (f"world {lc.world_size} = {lc.num_nodes} node(s) x {lc.nproc_per_node} rank(s); global batch "
            f"{cfg.batch.global_batch_size} = {lc.world_size} x micro {cfg.batch.micro_batch_size} x accumulation "
            f"{cfg.grad_accum}; lanes {cfg.data.lanes} ({cfg.data.lanes // lc.world_size} per rank), "
            f"{cfg.data.num_workers} worker(s) per rank"
            + (f" ({lc.cores_per_node} cores per node)" if lc.cores_per_node else ""))


def node_hostfile(cfg):
    """The one-launcher-per-node form without a hostfile: DeepSpeed's launcher takes the world's
    shape (nodes x slots) from a hostfile, so write one naming N nodes of nproc slots (with
    --no-ssh no host is contacted; node 0 is --master-addr). Returns cfg with launch.hostfile set."""
    import dataclasses

    lc = cfg.launch
    if not (lc.no_ssh and lc.hostfile is None and lc.num_nodes > 1):
        return cfg
    path = os.path.join(cfg.local_run_dir, "launch", f"hostfile-node{lc.node_rank}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Path(path).write_text("".join(f"node-{i} slots={lc.nproc_per_node}\n" for i in range(lc.num_nodes)))
    return dataclasses.replace(cfg, launch=dataclasses.replace(lc, hostfile=path))


def check_command(build) -> int:
    """`--check`: build the run config (`build()`) and print it with its layout line, exit 0 (on stderr, a
    warning when decode is projected below the GPU step rate: vit.budget.decode_warning). A config that
    cannot run raises its one-line error (exit 2 through cli.main). Nothing is launched, written or read
    beyond what `build` reads (a hostfile)."""
    from vit.budget import decode_warning

    cfg = build()
    print(cfg.to_json())
    print(layout_line(cfg))
    warning = None if cfg.launch.accelerator == "cpu" else decode_warning(cfg)
    if warning:
        print(warning, file=sys.stderr)
    return 0
