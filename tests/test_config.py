"""vit.config / vit.presets: typed configs, fix-it validation, overrides, schedules, DeepSpeed config."""
import json
import math
from pathlib import Path

import pytest

from vit.config import (
    BatchConfig,
    ConfigError,
    LaunchConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
    deepspeed_config,
)
from vit.model import ViTConfig, model_args
from vit.presets import PRESETS, deepspeed_examples, get_preset

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = get_preset(name)
    assert cfg.preset == name
    again = RunConfig.from_dict(json.loads(cfg.to_json()))
    assert again.to_dict() == cfg.to_dict()
    assert PRESETS[name].__doc__  # each preset says where its numbers come from


def test_paper_pretraining_recipe():
    cfg = get_preset("jft_vit_l16")
    assert cfg.optim.name == "adamw" and cfg.optim.betas == (0.9, 0.999) and cfg.optim.weight_decay == 0.1
    assert get_preset("i21k_vit_b16").optim.weight_decay == 0.03
    assert cfg.batch.global_batch_size == 4096 and cfg.schedule.warmup_steps == 10_000
    assert cfg.model.img_size == 224 and cfg.model.overrides["representation_size"] == 1024
    assert cfg.optim.grad_clip == 1.0 and cfg.task == "pretrain"


def test_paper_finetune_recipe():
    cfg = get_preset("imagenet_384_ft")
    assert cfg.task == "finetune" and cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 0.0 and cfg.optim.grad_clip == 1.0
    assert cfg.schedule.decay == "cosine" and cfg.batch.global_batch_size == 512 and cfg.model.img_size == 384


FINETUNE_PRESETS = {"imagenet_vit_b32_384_ft": ("vit_base_patch32", 384), "imagenet_vit_l16_384_ft": ("vit_large_patch16", 384),
                    "imagenet_vit_l32_384_ft": ("vit_large_patch32", 384), "imagenet_vit_h14_518_ft": ("vit_huge_patch14", 518)}


@pytest.mark.parametrize("name", sorted(FINETUNE_PRESETS))
@pytest.mark.parametrize("ranks", [(8, 1), (8, 8)])
def test_every_model_has_a_paper_finetune_preset_valid_at_8_and_64_ranks(name, ranks):
    """The paper fine-tunes every model (App. B.1.1): SGD m=0.9, batch 512, no wd, clip 1; 384 px, H/14 at 518 px."""
    model, img_size = FINETUNE_PRESETS[name]
    per_node, nodes = ranks
    cfg = apply_overrides(get_preset(name), [f"launch.nproc_per_node={per_node}", f"launch.num_nodes={nodes}",
                                             'data.url="s3://b/imagenet"', 'run_url="s3://b/runs/r"', 'init_from="s3://b/pt"'])
    cfg.check_ready()
    assert (cfg.model.name, cfg.model.img_size, cfg.task) == (model, img_size, "finetune")
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 0.0
    assert cfg.optim.grad_clip == 1.0 and cfg.schedule.decay == "cosine" and cfg.batch.global_batch_size == 512
    ds = deepspeed_config(cfg, accelerator="cuda")
    assert ds["train_batch_size"] == 512 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * per_node * nodes
    grid = ViTConfig(name=model, num_classes=1000, img_size=img_size, **model_args(model)).grid  # validates the size
    assert grid == (img_size // cfg.model.patch_size,) * 2


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*digits_tiny.*jft_vit_h14"):
        get_preset("vit_gigantic")


def test_batch_not_divisible_says_how_to_fix():
    with pytest.raises(ConfigError, match=r"not divisible by ranks \(3\).*multiple of 96"):
        apply_overrides(get_preset("digits_tiny"), ["launch.nproc_per_node=3"])
    with pytest.raises(ConfigError, match=r"micro_batch_size to a divisor of 32 \(e.g. 16\)"):
        apply_overrides(get_preset("digits_tiny"), ["launch.nproc_per_node=2", "batch.micro_batch_size=24"])


def test_grad_accum_is_derived_from_world_size():
    assert BatchConfig(global_batch_size=4096, micro_batch_size=32).grad_accum(32) == 4
    cfg = apply_overrides(get_preset("digits_tiny"), ["launch.nproc_per_node=2"])
    assert cfg.grad_accum == 1 and get_preset("digits_tiny").grad_accum == 2


def test_img_size_must_be_divisible_by_patch():
    with pytest.raises(ConfigError, match="img_size=18 is not divisible by the patch size 4.*16"):
        ModelConfig(name="vit_tiny_patch16", img_size=18, overrides={"patch_size": 4})
    with pytest.raises(ConfigError, match="patch size 16"):
        ModelConfig(name="vit_base_patch16", img_size=200)


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(get_preset("digits_tiny"), ["optim.lr=0.01", "model.overrides.depth=2", 'data.augment="none"'])
    assert cfg.optim.lr == 0.01 and cfg.model.overrides["depth"] == 2 and cfg.data.augment == "none"
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="not a config section"):
        apply_overrides(cfg, ["nope.x=1"])
    with pytest.raises(ConfigError, match="optim.name='lamb' is not one of"):
        apply_overrides(cfg, ['optim.name="lamb"'])
    with pytest.raises(ConfigError, match="unknown config key"):
        RunConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_launch_validation():
    with pytest.raises(ConfigError, match="no_ssh needs launch.node_rank"):
        LaunchConfig(no_ssh=True, master_addr="10.0.0.1")
    with pytest.raises(ConfigError, match="node_rank=2 must be in"):
        LaunchConfig(num_nodes=2, node_rank=2)
    with pytest.raises(ConfigError, match="on CPU use launch.precision=fp32 or bf16"):
        LaunchConfig(precision="fp16").resolved_precision("cpu")
    assert LaunchConfig(precision="bf16").resolved_precision("cpu") == "bf16"  # torch autocast runs on CPU too
    assert LaunchConfig().resolved_precision("cuda") == "bf16" and LaunchConfig().resolved_precision("cpu") == "fp32"
    assert LaunchConfig().resolved_accelerator(cuda_available=False) == "cpu"


def test_check_ready_names_missing_fields():
    with pytest.raises(ConfigError, match="--data"):
        get_preset("digits_tiny").check_ready()
    ft = apply_overrides(get_preset("digits_tiny_ft"), ['data.url="d"', 'run_url="r"'])
    with pytest.raises(ConfigError, match="init_from"):
        ft.check_ready()


def test_schedule_warmup_then_linear_and_cosine():
    lin = ScheduleConfig(total_steps=110, warmup_steps=10, decay="linear")
    assert lin.lr_factor(0) == pytest.approx(0.1) and lin.lr_factor(9) == pytest.approx(1.0)
    assert lin.lr_factor(60) == pytest.approx(0.5) and lin.lr_factor(110) == pytest.approx(0.0)
    cos = ScheduleConfig(total_steps=110, warmup_steps=10, decay="cosine")
    assert cos.lr_factor(60) == pytest.approx(0.5) and cos.lr_factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ConfigError, match="warmup_steps=200 must be < schedule.total_steps=100"):
        ScheduleConfig(total_steps=100, warmup_steps=200)


def test_deepspeed_config_gpu_and_cpu():
    gpu = deepspeed_config(apply_overrides(get_preset("jft_vit_h14"), ["launch.nproc_per_node=8", "launch.num_nodes=16"]),
                           accelerator="cuda")
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and gpu["zero_optimization"]["stage"] == 1
    assert "bf16" not in gpu  # fp32 weights and optimizer state; DeepSpeed's bf16 engine is not used
    assert gpu["train_batch_size"] == 4096 and gpu["gradient_accumulation_steps"] == 1 and gpu["gradient_clipping"] == 1.0
    cpu = deepspeed_config(get_preset("digits_tiny"), accelerator="cpu")
    assert "bf16" not in cpu and "fp16" not in cpu and "torch_autocast" not in cpu
    assert cpu["train_batch_size"] == cpu["train_micro_batch_size_per_gpu"] * cpu["gradient_accumulation_steps"]


def test_deploy_deepspeed_files_match_the_generator():
    for name, expected in deepspeed_examples().items():
        assert json.loads((ROOT / "deploy" / "deepspeed" / name).read_text()) == expected, name
