"""deploy/: every file parses, and what it references (entry points, flows, parameters, presets,
CLI commands and flags, work pools, files copied into the image) exists. No docker engine here,
so the container files are checked statically; the Prefect CLI flags they use are checked
against the installed Prefect's own --help."""
from __future__ import annotations

import datetime as dt
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.cmd_flows import build_deployments, load_entrypoint, next_runs, read_deployments, substitute_env, DeploymentFileError
from pipeline.settings import ConfigFileError, PipelineConfig, load_pipeline_config
from vit.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENV = {"VITPIPE_ROOT": "s3://prod", "VITPIPE_SOURCE": "s3://corpora/i21k", "VITPIPE_FT_SOURCE": "s3://corpora/in1k/train",
       "VITPIPE_EVAL_SOURCE": "s3://corpora/in1k/val", "VITPIPE_HOSTFILE": "/etc/vitpipe/hostfile", "VITPIPE_DASK_ADDRESS": ""}


def _presets_in(obj) -> list[str]:
    if isinstance(obj, dict):
        found = [obj["preset"]] if isinstance(obj.get("preset"), str) else []
        return found + [p for v in obj.values() for p in _presets_in(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in _presets_in(v)]
    return []


def test_prefect_yaml_deployments_load_and_validate():
    deps = read_deployments(DEPLOY / "prefect.yaml", env=ENV)
    names = {d["name"] for d in deps}
    assert names == {"shard-nightly", "pretrain-weekly", "finetune-daily", "pipeline-weekly"}
    flows = {d["name"]: load_entrypoint(d["entrypoint"]).name for d in deps}
    assert flows == {"shard-nightly": "shard_dataset", "pretrain-weekly": "pretrain", "finetune-daily": "finetune",
                     "pipeline-weekly": "vit_pipeline"}
    for dep in deps:
        flow = load_entrypoint(dep["entrypoint"])
        flow.validate_parameters(dep["parameters"])  # pydantic: the scheduled parameters fit the flow's signature
        assert dep["work_pool"]["name"] in ("vitpipe-cpu", "vitpipe-gpu")
        for preset in _presets_in(dep["parameters"]):
            assert preset in PRESETS, f"{dep['name']}: preset {preset} not in vit.presets"
    # the RunnerDeployments `vitpipe serve` would serve carry the cron schedules
    built = {d.name: d for d in build_deployments(deps)}
    assert built["pretrain-weekly"].schedules[0].schedule.cron == "0 3 * * 6"
    assert built["shard-nightly"].parameters["params"]["url"] == "s3://prod/datasets/pretrain"


def test_prefect_yaml_cron_next_run_times():
    """The schedules fire when the comments say (computed by the Prefect server's scheduler code)."""
    deps = {d["name"]: d for d in read_deployments(DEPLOY / "prefect.yaml", env=ENV)}
    after = dt.datetime(2026, 11, 18, 12, 0, tzinfo=dt.timezone.utc)  # a Wednesday noon
    expect = {
        "shard-nightly": [dt.datetime(2026, 11, 19, 1, 30), dt.datetime(2026, 11, 20, 1, 30)],  # daily 01:30
        "pretrain-weekly": [dt.datetime(2026, 11, 21, 3, 0), dt.datetime(2026, 11, 28, 3, 0)],  # Saturdays 03:00
        "finetune-daily": [dt.datetime(2026, 11, 19, 6, 0), dt.datetime(2026, 11, 20, 6, 0)],  # daily 06:00
        "pipeline-weekly": [dt.datetime(2026, 11, 22, 2, 0), dt.datetime(2026, 11, 29, 2, 0)],  # Sundays 02:00
    }
    for name, times in expect.items():
        sched = deps[name]["schedules"][0]
        assert sched["timezone"] == "UTC"
        got = next_runs(sched["cron"], timezone=sched["timezone"], after=after, count=2)
        assert [t.astimezone(dt.timezone.utc).replace(tzinfo=None) for t in got] == times, name


def test_env_templates_must_be_set():
    with pytest.raises(DeploymentFileError, match=r"shard-nightly\.parameters\.params\.source: environment variable VITPIPE_SOURCE is not set"):
        read_deployments(DEPLOY / "prefect.yaml", env={})
    assert substitute_env({"a": ["x-{{ $V }}-y"]}, {"V": "1"}, where="t") == {"a": ["x-1-y"]}


def test_pipeline_example_config_is_valid_and_strict(tmp_path):
    cfg = load_pipeline_config(str(DEPLOY / "pipeline.example.yaml"))
    assert isinstance(cfg, PipelineConfig)
    assert cfg.pretrain.preset in PRESETS and cfg.finetune.preset in PRESETS
    assert cfg.pretrain.hostfile and (ROOT / cfg.pretrain.hostfile).name == "hostfile.example"
    data = yaml.safe_load((DEPLOY / "pipeline.example.yaml").read_text())

    data["pretrain"]["learning_rate"] = 0.1  # unknown key
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigFileError, match=r"pretrain\.learning_rate: Extra inputs are not permitted"):
        load_pipeline_config(str(bad))

    data["pretrain"].pop("learning_rate")
    data["pretrain_data"]["shard_size"] = "big"  # wrong type
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigFileError, match=r"pretrain_data\.shard_size"):
        load_pipeline_config(str(bad))


def test_vitpipe_run_rejects_bad_config_before_running(tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "c.yaml"
    bad.write_text("root: /tmp/x\npretrain: {preset: digits_tiny, nproc: 2}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.yaml" in err and "pretrain.nproc" in err


@pytest.mark.parametrize("check", [True, False])
def test_a_typo_inside_set_fails_before_anything_runs(tmp_path, capsys, check):
    """`schedule.total_stepz=5` in pretrain.set: `run --check` exited 0; `run` sharded three datasets first."""
    from pipeline.cli import main

    data = yaml.safe_load((DEPLOY / "pipeline.example.yaml").read_text())
    data["root"] = str(tmp_path / "root")
    for name in ("pretrain_data", "finetune_data", "eval_data"):
        data[name]["url"] = str(tmp_path / name)
    data["pretrain"]["set"] = ["schedule.total_stepz=5"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), *(["--check"] if check else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.yaml: pretrain:" in err and "total_stepz" in err, err
    assert not any((tmp_path / name).exists() for name in ("root", "pretrain_data", "finetune_data", "eval_data"))


def test_dockerfile_copies_what_exists_and_runs_vitpipe():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)
    assert yaml.safe_load(entry) == ["vitpipe"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'vitpipe = "pipeline.cli:main"' in pyproject
    # the deployments' pull step works in the image's working directory
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    pull = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["pull"][0]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == workdir


def _prefect_help(words: tuple[str, ...]) -> str:
    """`prefect WORDS --help` of the installed Prefect CLI, run in-process (a subprocess each costs ~8 s)."""
    import contextlib
    import io

    from prefect.cli._app import _app

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        _app.meta([*words, "--help"])
    assert exit_info.value.code in (0, None), f"prefect {' '.join(words)} --help failed"
    return buf.getvalue()


def _commands(obj) -> list[list[str]]:
    """Commands of compose services and k8s containers, as argv lists."""
    found = []
    if isinstance(obj, dict):
        for key in ("command",):
            value = obj.get(key)
            entry = obj.get("entrypoint")
            if isinstance(value, list) and value:
                argv = (entry if isinstance(entry, list) else []) + value
                found.append(argv)
        for v in obj.values():
            found += _commands(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _commands(v)
    return found


def test_compose_and_k8s_commands_exist():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"postgres", "prefect-server", "seaweedfs", "worker"} <= set(compose["services"])
    assert "postgresql+asyncpg" in compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "prefect-worker.yaml").read_text()))
    assert {d["kind"] for d in docs} >= {"ServiceAccount", "Role", "RoleBinding", "Deployment"}

    pools_in_yaml = {d["work_pool"]["name"] for d in read_deployments(DEPLOY / "prefect.yaml", env=ENV)}
    prefect_cmds: list[list[str]] = []
    pools_served = set()
    for argv in _commands(compose) + _commands(docs):
        if argv[0] == "sh":  # `sh -c "a && b"`: split into commands
            for part in argv[-1].split("&&"):
                prefect_cmds.append(shlex.split(part))
            continue
        if argv[0].endswith("weed"):
            assert argv[1] == "mini"
            continue
        prefect_cmds.append(argv)
    helps: dict[tuple, str] = {}
    for argv in prefect_cmds:
        assert argv[0] == "prefect", argv
        global_flags = [a for a in argv[1:] if a == "--no-prompt"]
        sub = [a for a in argv[1:] if a not in global_flags]
        # the subcommand: "server start", "worker start", "work-pool create" or "deploy"
        depth = {"server": 2, "worker": 2, "work-pool": 2, "deploy": 1}[sub[0]]
        words = tuple(sub[:depth])
        text = helps.setdefault(words, _prefect_help(words))
        for flag in (a.split("=")[0] for a in sub[depth:] if a.startswith("--")):
            assert flag in text, f"`prefect {' '.join(words)}` has no {flag}"
        if global_flags:
            assert "--no-prompt" in helps.setdefault((), _prefect_help(()))
        if "--pool" in argv:
            pools_served.add(argv[argv.index("--pool") + 1])
        if words == ("work-pool", "create"):
            pools_served.add(sub[2])
        if words == ("deploy",):
            assert sub[sub.index("--prefect-file") + 1] == "deploy/prefect.yaml"
    assert pools_in_yaml <= pools_served, "a work pool of prefect.yaml has no worker"


def test_vitpipe_invocations_in_docs_parse():
    """Every `vitpipe <sub> ...` written in the orchestration deploy files parses with the real CLI parser."""
    parser = build_parser()
    seen = 0
    ours = ["prefect.yaml", "pipeline.example.yaml", "compose.yaml", "k8s/prefect-worker.yaml", "Dockerfile"]
    for path in (DEPLOY / name for name in ours):
        for m in re.finditer(r"`(vitpipe [^`]+)`", path.read_text()):
            argv = shlex.split(m.group(1))[1:]
            argv = ["1" if a.lstrip("$").isupper() else a for a in argv]  # placeholders: RUN, DEST, $VAR
            args = parser.parse_args(argv)
            assert getattr(args, "func", None), m.group(1)
            seen += 1
    assert seen >= 2
