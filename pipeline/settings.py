"""The typed settings of each stage: one set of defaults for the CLI, the flows and the deployments.

`vitpipe shard|pretrain|finetune|evaluate` build these from their flags (whose defaults are read
from here), the Prefect flows take them as parameters, `vitpipe run CONFIG.yaml` reads a
`PipelineConfig`. `check_pipeline_config` resolves every training stage's RunConfig (preset +
every `set` entry) so a typo fails before anything runs.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shards.errors import VitpipeError
from shards.plan import ShardSettings


class ConfigFileError(VitpipeError, ValueError):
    """A pipeline config file that cannot be used (names the file and key)."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetParams(_Params):
    """One dataset: shard ``source`` into ``url`` (or, with no source, use the shards already at ``url``)."""

    url: str = Field(description="where the shards and manifest.json go (local folder or s3://bucket/prefix)")
    source: str | None = Field(None, description="class-folder tree, tar-of-tars or JFT-style manifest; None: url is already sharded")
    name: str = Field(ShardSettings.name, description="shard file prefix: <name>-000000.tar")
    shard_size: int = Field(ShardSettings.shard_size, gt=0, description="samples per shard")
    settings: dict[str, Any] = Field(default_factory=dict, description="further keyword settings of shards.ShardSettings")
    workers: int | None = Field(None, ge=1, description="processes that plan and write (None: every usable core)")
    dask_address: str | None = Field(None, description="Dask scheduler (tcp://host:8786) whose workers list, scan and write "
                                                       "(None: $VITPIPE_DASK_ADDRESS, else local processes)")
    partitions: int | None = Field(None, ge=1, description="pieces the source is cut into for listing and scanning "
                                                           "(None: 4 per worker; the shards do not depend on it)")
    window: int | None = Field(None, ge=1, description="records per window: shards are written while the rest of the source "
                                                       "is scanned, each shuffled within a window of consecutive class "
                                                       "folders/tars/manifest blocks (None: one global shuffle)")


class TrainParams(_Params):
    """A training stage: a preset from vit.presets plus overrides, and how to launch it."""

    preset: str = Field(description="run preset name in vit.presets (e.g. digits_tiny)")
    set: list[str] = Field(default_factory=list, description="config overrides key=value, e.g. schedule.total_steps=50")
    steps: int | None = Field(None, ge=1, description="total optimizer steps (None: the preset's)")
    img_size: int | None = Field(None, ge=1, description="training resolution (None: the preset's)")
    nproc_per_node: int | None = Field(None, ge=1, description="ranks per node (None: the preset's)")
    nnodes: int | None = Field(None, ge=1, description="nodes (with no_ssh and no hostfile: every node's launcher passes the same N)")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile ('HOST slots=N' lines) for multi-node runs")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "impi"] | None = Field(None, description="multi-node launcher (default pdsh)")
    no_ssh: bool = Field(False, description="start only this node's ranks (one launcher per node)")
    node_rank: int | None = Field(None, ge=0, description="this node's index (with no_ssh)")
    master_addr: str | None = Field(None, description="address of node 0 (with no_ssh)")
    master_port: int | None = Field(None, description="rendezvous port (None: the preset's, 29500)")
    stall_timeout: float = Field(600.0, gt=0, description="seconds without a new training step before the ranks are killed and retried")
    retries: int = Field(2, ge=0, description="relaunches after a failed or stalled launch (each resumes from the last checkpoint)")


class EvalParams(_Params):
    batch_size: int = Field(64, ge=1, description="evaluation batch size per rank")
    img_size: int | None = Field(None, description="None: the model's resolution")
    nproc: int = Field(1, ge=1, description="evaluation ranks (> 1: started by the DeepSpeed launcher)")
    report: bool = Field(True, description="draw the HTML run report (figures, curves)")


class TaskRunnerParams(_Params):
    """Where mapped tasks (one per shard) run: a local Dask cluster of processes, a Dask cluster's address, or threads."""

    kind: Literal["dask", "threads"] = "dask"
    address: str | None = Field(None, description="tcp://scheduler:8786 of a running Dask cluster; None: start a local one")
    workers: int = Field(2, ge=1, description="local cluster: worker processes (threads: pool size)")


class PipelineConfig(_Params):
    """The whole chain; `vitpipe run CONFIG.yaml` reads this (unknown keys are rejected)."""

    root: str = Field(description="storage root holding runs/ (local folder or s3://bucket/prefix)")
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    pretrain_data: DatasetParams
    finetune_data: DatasetParams
    eval_data: DatasetParams
    pretrain: TrainParams
    finetune: TrainParams
    evaluate: EvalParams = Field(default_factory=EvalParams)
    task_runner: TaskRunnerParams = Field(default_factory=TaskRunnerParams)


def load_pipeline_config(path: str) -> PipelineConfig:
    """Read and validate a YAML pipeline config, every `set` entry included; errors name the key and the file."""
    import yaml
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read it ({err.strerror}); pass an existing pipeline YAML") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of pipeline settings at the top level (see deploy/pipeline.example.yaml)")
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.errors()]
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigFileError(f"{path}: {'; '.join(problems[:5])}{more}; see deploy/pipeline.example.yaml") from None
    check_pipeline_config(config, where=path)
    return config


def check_pipeline_config(config: PipelineConfig, *, where: str = "pipeline config") -> None:
    """Resolve the RunConfig of each training stage (preset, steps, every `set` entry) without touching storage."""
    from pipeline.stages import build_run_config
    from vit.config import ConfigError

    for stage in ("pretrain", "finetune"):
        params = getattr(config, stage)
        try:
            build_run_config(params, dataset_url=getattr(config, f"{stage}_data").url, root=config.root,
                             run_id=f"{stage}-check", init_from="<pretrain run>" if stage == "finetune" else None)
        except ConfigError as err:
            raise ConfigFileError(f"{where}: {stage}: {err}") from None
