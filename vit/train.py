"""Per-rank training entry point started by the DeepSpeed launcher.

    python -m vit.train --config CONFIG_JSON_PATH_OR_URL

One loop for pretraining and fine-tuning (`task`), driven by a `vit.config.RunConfig`.
Every rank reports to the launcher through its status file (`vit.status`); rank 0 also writes
metrics.csv / TensorBoard and the final weights (run.json belongs to the stage layer,
`pipeline.stages`). Every rank takes part in DeepSpeed
checkpoints, which go to `<run>/checkpoints/` (synced to object storage after each save).
A run whose folder already holds a checkpoint resumes from the latest one, also on a
different world size (through DeepSpeed's universal checkpoint when ZeRO shards the
optimizer state).

Corrupt samples (replaced by a neighbour in the batch) are counted over all ranks; above
`data.max_corrupt_share` of the samples seen, the run fails naming the shards.

Test-only fault injection: VITPIPE_FAULT, read once in `main`: `step=N:fail` (exit 13 after
step N), `step=N:hang`, optionally `:rank=R` (default 0); `keys` writes the sample keys each rank
consumed per step to <run>/keys/rank<R>.jsonl. Not a user setting.

metrics.csv `mfu` is an ESTIMATE: flops_per_image x 3 x images/s / (peak x ranks), where peak is
`peak_flops` from the config, else a GEMM measured at start-up (CPU) or the GPU's table value
(`GPU_PEAK_FLOPS`: H100, A100).
"""
from __future__ import annotations

import argparse
import csv
import faulthandler
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from shards import storage
from shards.errors import JobFailed, VitpipeError
from vit.budget import H100_BF16_PEAK
from vit.config import RunConfig, deepspeed_config
from vit.fewshot import fewshot_columns, fewshot_due, fewshot_metrics
from vit.runs import RunFolder
from vit.status import StatusWriter, status_path

METRIC_FIELDS = ["step", "epoch", "loss", "lr", "images_per_sec", "mfu"]
# dense peak FLOP/s per GPU and precision, for the logged MFU (fp32: without TF32); unverified on GPU
GPU_PEAK_FLOPS = {
    "H100": {"bf16": H100_BF16_PEAK, "fp16": H100_BF16_PEAK, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
}
FAULT_EXIT_CODE = 13


class CorruptData(JobFailed):
    """Too many samples could not be read: the dataset is broken (a relaunch would not help)."""


@dataclass(frozen=True)
class Fault:
    """Test-only fault injection (VITPIPE_FAULT): `action` ("fail" | "hang") on `rank` after `step`."""

    step: int | None = None
    action: str | None = None
    rank: int = 0
    keys: bool = False

    @classmethod
    def parse(cls, text: str) -> "Fault":
        fields: dict = {}
        for part in filter(None, text.split(":")):
            name, _, value = part.partition("=")
            if name in ("fail", "hang"):
                fields["action"] = name
            elif name == "keys":
                fields["keys"] = True
            elif name in ("step", "rank") and value.isdigit():
                fields[name] = int(value)
            else:
                raise SystemExit(f"VITPIPE_FAULT={text!r}: unknown part {part!r} (test-only: step=N:fail|hang[:rank=R][:keys])")
        return cls(**fields)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job, read once from the launcher's environment."""

    rank: int
    local_rank: int
    world_size: int


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- building blocks


def gpu_peak_flops(device_name: str, precision: str) -> float:
    """``GPU_PEAK_FLOPS`` for the GPU whose name (``torch.cuda.get_device_name()``) names one; A100 otherwise."""
    table = next((peaks for gpu, peaks in GPU_PEAK_FLOPS.items() if gpu in device_name), GPU_PEAK_FLOPS["A100"])
    return table.get(precision, table["bf16"])


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 3) -> float:
    """fp32 GEMM FLOP/s of this process (the CPU 'peak' used for the MFU estimate)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def build_model(cfg: RunConfig, *, num_classes: int) -> torch.nn.Module:
    """Pretrain: a fresh model from the config. Finetune: load `init_from`, then prepare_for_finetune."""
    import vit

    if cfg.task == "finetune":
        from vit.checkpoint import load_model

        model = load_model(cfg.init_from)
        return vit.prepare_for_finetune(model, num_classes=num_classes, img_size=cfg.model.img_size,
                                        mode=cfg.model.posemb_resample)
    return vit.create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size, **cfg.model.overrides)


def init_head_bias_from_prior(model: torch.nn.Module, prior: torch.Tensor) -> None:
    """Sigmoid (multi-label) head: bias = log(p / (1 - p)) of the label priors (not a fixed -10)."""
    p = prior.double().clamp(1e-6, 1 - 1e-6)
    with torch.no_grad():
        model.head.bias.copy_(torch.log(p / (1 - p)).to(model.head.bias.dtype))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (kernels) only, as big_vision does; not on biases, norms, tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name.endswith("weight") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, *, fused: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW / SGD, handed to DeepSpeed as the client optimizer (ZeRO wraps it; DeepSpeed's own
    FusedAdam is only built from a DeepSpeed "optimizer" section, which vit.config does not write).
    AdamW `fused`: one kernel per step over all tensors (CUDA, unverified on GPU here; torch has a CPU
    kernel too, off by default there: `optim.fused`); fused=False is torch's default path."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=fused or None)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.dtype.is_floating_point:  # multi-hot: sigmoid cross-entropy summed over classes
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]
    return F.cross_entropy(logits.float(), targets)


# ----------------------------------------------------------------------------- run-folder I/O


class RunIO:
    """Local working copy of the run folder; mirrors to storage when the run lives in s3://."""

    def __init__(self, cfg: RunConfig, dist: Dist) -> None:
        self.run = RunFolder(cfg.run_url)
        self.remote = storage.is_s3(cfg.run_url)
        self.local = cfg.local_run_dir
        self.dist = dist
        os.makedirs(self.ckpt_dir, exist_ok=True)

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.local, "checkpoints")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.local, "metrics.csv")

    def pull_checkpoint(self, tag: str) -> None:
        """Bring checkpoints/<tag> (+ latest, metrics.csv) down from storage (once per node)."""
        if not self.remote or os.path.exists(os.path.join(self.ckpt_dir, tag)):
            return
        storage.copy_tree(self.run.file("checkpoints", tag), os.path.join(self.ckpt_dir, tag))
        with open(os.path.join(self.ckpt_dir, "latest"), "w") as f:
            f.write(tag)
        if self.dist.rank == 0 and storage.exists(self.run.metrics):
            storage.download_file(self.run.metrics, self.metrics_path)

    def push_checkpoint(self, tag: str) -> None:
        """Upload checkpoints/<tag> from this node, then (rank 0, after a barrier) `latest` last."""
        if not self.remote:
            return
        import deepspeed.comm as dist

        if self.dist.local_rank == 0:
            storage.copy_tree(os.path.join(self.ckpt_dir, tag), self.run.file("checkpoints", tag))
        dist.barrier()
        if self.dist.rank == 0:
            self.push_logs()
            storage.write_bytes(self.run.file("checkpoints", "latest"), tag.encode())

    def push_logs(self) -> None:
        if not self.remote:
            return
        if os.path.exists(self.metrics_path):
            storage.upload_file(self.metrics_path, self.run.metrics)
        tb = os.path.join(self.local, "tb")
        if os.path.isdir(tb):
            storage.copy_tree(tb, self.run.tb)


class MetricsLog:
    """Rank 0: metrics.csv (append, trimmed to the resumed step), TensorBoard, one-line progress."""

    def __init__(self, path: str, tb_dir: str, *, resume_step: int, fields: list[str] = METRIC_FIELDS) -> None:
        self.path = path
        rows = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(tb_dir)

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        for k in ("loss", "lr", "images_per_sec", "mfu"):
            self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        for k in row.keys() - METRIC_FIELDS:  # evaluations (few-shot accuracy)
            self.tb.add_scalar(f"eval/{k}", row[k], row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


# ----------------------------------------------------------------------------- the loop


def setup_distributed(accelerator: str, *, threads: int) -> None:
    import deepspeed

    if accelerator == "cpu":
        torch.set_num_threads(threads)  # oversubscribed OpenMP threads slow CPU ranks down many times
        # DeepSpeed's shared-memory all-reduce is only used for inference all-reduce; not building it
        # saves a ~2 min JIT compile on first use. Training collectives go through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if accelerator == "cuda" else "gloo")  # nccl: unverified on GPU


def convert_to_universal(ckpt_dir: str, tag: str) -> str:
    """DeepSpeed checkpoint -> universal checkpoint `<tag>_universal` (for a new world size)."""
    from deepspeed.checkpoint import ds_to_universal

    out = f"{tag}_universal"
    if not os.path.exists(os.path.join(ckpt_dir, out, "zero")):
        tmp = os.path.join(ckpt_dir, out + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp, num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )
        ds_to_universal.main(args)
        os.replace(tmp, os.path.join(ckpt_dir, out))
    return out


def batches_from(stream, *, start_step: int) -> Iterator[tuple[int, int, Any]]:
    """(global_step, epoch, batch) from `start_step` on, crossing epochs; position = f(global step)."""
    spe = stream.steps_per_epoch
    epoch, s = divmod(start_step, spe)
    while True:
        for batch in stream.batches(epoch, start_step=s):
            yield epoch * spe + batch.step, epoch, batch
        epoch, s = epoch + 1, 0


def corrupt_check(stream, cfg: RunConfig, *, samples: int, world: int) -> int:
    """All ranks: the corrupt samples seen so far by every rank; raise CorruptData above the allowed share."""
    import deepspeed.comm as dist

    count = torch.tensor([len(stream.corrupt)], dtype=torch.long)
    dist.all_reduce(count)
    total = int(count.item())
    if samples and total > cfg.data.max_corrupt_share * samples:
        names = [sorted({key.split("#", 1)[0] if "#" in key else key for key, _ in stream.corrupt})]
        gathered = [None] * world
        dist.all_gather_object(gathered, names[0])
        where = sorted({n for part in gathered for n in part})
        raise CorruptData(
            f"{total} of {samples} samples seen could not be read (> data.max_corrupt_share={cfg.data.max_corrupt_share}); "
            f"in {', '.join(where[:8])}{' ...' if len(where) > 8 else ''} of {cfg.data.url}; run `vitpipe verify` on it "
            "and re-shard, or raise data.max_corrupt_share")
    return total


def train(cfg: RunConfig, dist_info: Dist, *, status: StatusWriter, fault: Fault = Fault()) -> dict:
    import deepspeed
    import deepspeed.comm as dist
    from vit.data import TrainStream, to_device

    cfg.check_ready()
    accelerator = cfg.launch.resolved_accelerator(cuda_available=torch.cuda.is_available())
    threads = cfg.launch.cpu_threads_per_rank or max(1, (os.cpu_count() or 1) // cfg.launch.nproc_per_node)
    setup_distributed(accelerator, threads=threads)
    rank, world = dist_info.rank, dist_info.world_size
    if world != cfg.launch.world_size:  # the launcher's view wins (hostfile may differ); re-validate batch split
        cfg.launch.nproc_per_node, cfg.launch.num_nodes = world, 1
        cfg.batch.grad_accum(world)
    is0 = rank == 0
    io = RunIO(cfg, dist_info)
    run = io.run

    # --- where to start
    tag = None if cfg.checkpoint.resume == "never" else run.latest_checkpoint()
    if cfg.checkpoint.resume == "must" and tag is None:
        raise JobFailed(f"checkpoint.resume=must but {run.checkpoints} holds no checkpoint")
    if tag and dist_info.local_rank == 0:
        io.pull_checkpoint(tag)
    dist.barrier()
    load_tag, load_universal = tag, cfg.checkpoint.load_universal
    if tag:
        saved_world = _saved_world_size(os.path.join(io.ckpt_dir, tag))
        if cfg.launch.zero_stage >= 1 and (saved_world != world or load_universal):
            if dist_info.local_rank == 0:
                log(f"[vit.train] checkpoint {tag} was written by {saved_world} ranks, now {world}: converting to universal")
                convert_to_universal(io.ckpt_dir, tag)
            dist.barrier()
            load_tag, load_universal = f"{tag}_universal", True
    cfg.checkpoint.load_universal = load_universal

    # --- data, model, engine
    stream = TrainStream(
        cfg.data.url, img_size=cfg.model.img_size, global_batch_size=cfg.batch.global_batch_size, rank=rank,
        world_size=world, seed=cfg.data.seed, num_workers=cfg.data.num_workers, lanes=cfg.data.lanes,
        augment=cfg.data.augment, label_mode=cfg.data.label_mode, decode=cfg.data.decode, device=accelerator,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=stream.num_classes)
    if stream.multi_label:
        init_head_bias_from_prior(model, torch.as_tensor(stream.label_prior))
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    optimizer = build_optimizer(cfg, model, fused=accelerator == "cuda" if cfg.optim.fused is None else cfg.optim.fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.schedule.lr_factor)
    ds_config = deepspeed_config(cfg, accelerator=accelerator)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if cfg.model.compile:
        engine.compile()  # torch.compile of engine.module in place (state-dict keys unchanged)
    if is0:
        log(f"[vit.train] step: precision {cfg.launch.resolved_precision(accelerator)}, compiled {engine.is_compiled}, "
            f"grad checkpointing {engine.module.grad_checkpointing}, {type(engine.basic_optimizer).__name__} "
            f"fused {getattr(engine.basic_optimizer, 'defaults', {}).get('fused')}")
    # bf16 is autocast inside the engine (fp32 inputs and weights); fp16 is DeepSpeed's fp16 engine (fp16 inputs)
    dtype = torch.float16 if cfg.launch.resolved_precision(accelerator) == "fp16" else torch.float32
    device = engine.device

    start_step = 0
    if tag:
        _, client = engine.load_checkpoint(io.ckpt_dir, tag=load_tag)
        start_step = int(client["step"])
        stream.check_resume(client["data_position"])
        if is0:
            log(f"[vit.train] resumed from {run.checkpoints}/{tag} at step {start_step} "
                f"(data position {client['data_position']}, saved by {client.get('world_size')} ranks, now {world})")

    # --- rank-0 outputs
    metrics = None
    total = cfg.schedule.total_steps
    status.write("started", rank=rank, world_size=world, start_step=start_step, total_steps=total)
    if is0:
        metrics = MetricsLog(io.metrics_path, os.path.join(io.local, "tb"), resume_step=start_step,
                             fields=METRIC_FIELDS + fewshot_columns(cfg.fewshot))
    keys_file = None
    if fault.keys:
        os.makedirs(os.path.join(io.local, "keys"), exist_ok=True)
        keys_file = open(os.path.join(io.local, "keys", f"rank{rank}.jsonl"), "a")
    flops_per_image = engine.module.flops_per_image()
    peak = cfg.peak_flops or (measure_cpu_peak_flops() if accelerator == "cpu" else gpu_peak_flops(
        torch.cuda.get_device_name(), cfg.launch.resolved_precision(accelerator)))

    # --- loop
    accum = cfg.grad_accum
    corrupt = 0
    spe = stream.steps_per_epoch
    last_loss = float("nan")
    if is0:
        log(f"[vit.train] {cfg.task} {run.run_id}: {world} rank(s) x micro {cfg.batch.micro_batch_size} x accum {accum}"
            f" = {cfg.batch.global_batch_size}; steps {start_step}->{total}; {spe} steps/epoch; {accelerator}")
    t_last = time.perf_counter()
    engine.train()
    for step, epoch, batch in batches_from(stream, start_step=start_step):
        if step >= total:
            break
        images = to_device(batch.images, device=device, dtype=dtype, mean=stream.mean, std=stream.std)
        targets = batch.targets.to(device)
        lr = scheduler.get_last_lr()[0]  # the lr this step uses
        micro_losses = []
        for x, y in zip(images.chunk(accum), targets.chunk(accum)):
            loss = loss_fn(engine(x), y)
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        loss_t = torch.stack(micro_losses).mean()
        dist.all_reduce(loss_t)
        last_loss = loss_t.item() / world
        done = step + 1
        if keys_file:
            keys_file.write(_json_line({"step": step, "epoch": epoch, "world_size": world, "keys": list(batch.keys)}))
            keys_file.flush()
        samples = (done - start_step) * cfg.batch.global_batch_size
        logging_step = done % cfg.log_every == 0 or done == total
        if logging_step:
            corrupt = corrupt_check(stream, cfg, samples=samples, world=world)
        if is0:
            now = time.perf_counter()
            ips = cfg.batch.global_batch_size / max(now - t_last, 1e-9)
            t_last = now
            mfu = flops_per_image * 3 * ips / (peak * world)
            if step == 0:
                k = stream.num_classes
                log(f"[vit.train] first loss {last_loss:.4f} (ln K = ln {k} = {math.log(k):.4f})")
            fewshot = fewshot_due(cfg.fewshot, done, total)
            if logging_step or fewshot:
                row = {"step": done, "epoch": epoch, "loss": f"{last_loss:.6f}", "lr": f"{lr:.6g}",
                       "images_per_sec": f"{ips:.2f}", "mfu": f"{mfu:.4f}"}
                if fewshot:
                    accuracies = fewshot_metrics(engine.module, cfg.fewshot)
                    row.update(accuracies)
                    log(f"[vit.train] few-shot linear accuracy at step {done}: {accuracies}")
                    t_last = time.perf_counter()  # the next step's img/s leaves the evaluation out
                metrics.write(row)
                log(f"step {done}/{total} epoch {epoch} loss {last_loss:.4f} lr {lr:.3g} img/s {ips:.1f} mfu~{mfu:.3f}")
                if logging_step:  # `corrupt` is counted (collectively) on logging steps only
                    status.write("step", step=done, total_steps=total, epoch=epoch, loss=round(last_loss, 6), lr=lr,
                                 images_per_sec=round(ips, 2), corrupt=corrupt, samples=samples)
        stopping = cfg.stop_after is not None and cfg.stop_after <= done < total
        if done % cfg.checkpoint.every_steps == 0 or done == total or stopping:
            ckpt_tag = f"step{done:08d}"
            e, s = divmod(done, spe)
            client_state = {"step": done, "data_position": stream.state(epoch=e, step=s), "world_size": world}
            engine.save_checkpoint(io.ckpt_dir, tag=ckpt_tag, client_state=client_state)
            io.push_checkpoint(ckpt_tag)
            if is0:
                log(f"[vit.train] checkpoint {ckpt_tag} saved")
                status.write("checkpoint", step=done, tag=ckpt_tag)
        if fault.step == done and rank == fault.rank and fault.action == "fail":
            log(f"[vit.train] fault injection: rank {rank} exits with code {FAULT_EXIT_CODE} after step {done}")
            status.write("failed", error=f"fault injection after step {done}", exit_code=FAULT_EXIT_CODE, transient=True)
            os._exit(FAULT_EXIT_CODE)
        if fault.step == done and rank == fault.rank and fault.action == "hang":
            log(f"[vit.train] fault injection: rank {rank} hangs after step {done}")
            while True:
                time.sleep(60)
        if stopping:
            if is0:
                metrics.close()
                io.push_logs()
                log(f"[vit.train] stop_after={cfg.stop_after}: stopping at step {done} of {total}; rerun to resume")
            status.write("stopped", step=done, total_steps=total, final_loss=last_loss, corrupt=corrupt, samples=samples)
            dist.barrier()
            return {"final_loss": last_loss, "steps": done}

    # --- final weights, then run.json complete last
    stream.close()  # the data workers kept for a next epoch: none comes
    if keys_file:
        keys_file.close()
    result = {"final_loss": last_loss, "steps": total, "corrupt_samples": corrupt}
    from vit.checkpoint import save_model
    from vit.export import TIMM_FOLDER, export_timm

    with _full_params(engine, zero_stage=cfg.launch.zero_stage):  # every rank takes part under ZeRO-3
        if is0:
            save_model(engine.module, run.url)
            export_timm(engine.module, storage.join(run.url, TIMM_FOLDER), label_names=list(stream.info.classes))
    if is0:
        metrics.close()
        io.push_logs()
        log(f"[vit.train] done: {run.url} (final loss {last_loss:.4f})")
    dist.barrier()
    status.write("finished", steps=total, final_loss=last_loss, corrupt=corrupt,
                 samples=(total - start_step) * cfg.batch.global_batch_size)
    return result


def _full_params(engine, *, zero_stage: int):
    """Context in which engine.module holds full parameters (gathers ZeRO-3 partitions)."""
    import contextlib

    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _json_line(obj: dict) -> str:
    import json

    return json.dumps(obj) + "\n"


def _saved_world_size(tag_dir: str) -> int:
    files = [f for f in os.listdir(tag_dir) if f.endswith("optim_states.pt")]
    if files:
        return len(files)
    return 1


def _terminated(status: StatusWriter):
    def handler(signum, frame) -> None:  # the launcher terminates the surviving ranks when one fails
        status.write("terminated", signal=signum)
        log(f"[vit.train] rank {os.environ.get('RANK', '?')} terminated by the launcher (signal {signum})")
        os._exit(128 + signum)

    return handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run config JSON (path or s3:// URL)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = parser.parse_args(argv)
    env = os.environ
    dist_info = Dist(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", args.local_rank or 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
    )
    if env.get("AWS_ENDPOINT_URL"):
        storage.configure(endpoint_url=env["AWS_ENDPOINT_URL"])
    cfg = RunConfig.from_dict(storage.read_json(args.config))
    status = StatusWriter(status_path(cfg.log_dir, dist_info.rank))
    signal.signal(signal.SIGTERM, _terminated(status))
    # if SIGTERM arrives while blocked in a collective, the Python handler cannot run: dump stacks from C
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    try:
        train(cfg, dist_info, status=status, fault=Fault.parse(env.get("VITPIPE_FAULT", "")))
    except Exception as err:
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        status.write("failed", error=line, transient=err.transient if isinstance(err, VitpipeError) else True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
