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


def test_vitpipe_deploy_names_a_missing_environment_variable(capsys, monkeypatch):
    from pipeline.cli import main

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("VITPIPE_DASK_ADDRESS")
    assert main(["deploy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipeline-weekly" in err and "environment variable VITPIPE_DASK_ADDRESS is not set" in err


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


def test_dockerfile_copies_what_the_package_build_needs():
    """The image installs the project as `pip install -e .` does: every file the build reads is copied."""
    import tomllib

    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    copied = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
            copied.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {"setup.py"} if (ROOT / "setup.py").exists() else set()
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and any(p.match(g) for g in patterns)}
    assert needed <= copied, f"Dockerfile does not copy {sorted(needed - copied)}"
    assert "deploy" in copied  # prefect.yaml, the work-pool template
    assert re.search(r"pip install -e '\.\[k8s\]'", text) and "k8s" in project["project"]["optional-dependencies"]
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)
    assert yaml.safe_load(entry) == ["vitpipe"]
    assert project["project"]["scripts"]["vitpipe"] == "pipeline.cli:main"
    # the deployments' pull step goes to $VITPIPE_HOME, which the image sets to its WORKDIR
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    assert re.search(rf"VITPIPE_HOME={re.escape(workdir)}\b", text)
    assert yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["pull"] == [{"pipeline.deploy_steps.set_project_directory": {}}]


def test_dockerfile_torch_comment_tells_the_truth():
    """The pinned torch pip installs (the one in this venv) is a CUDA build; the comment must say so."""
    import torch

    text = (DEPLOY / "Dockerfile").read_text()
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert torch.__version__.split("+")[0] == pinned
    assert "CPU torch by default" not in comment
    if torch.version.cuda:
        assert "CUDA build" in comment and "TORCH_INDEX_URL" in comment
    assert f'"torch=={pinned}"' in text  # the CPU-index install keeps the pin


def test_pull_step_finds_the_project_outside_a_container(tmp_path, monkeypatch):
    from pipeline.deploy_steps import StepError, project_directory, set_project_directory

    assert project_directory({}) == str(ROOT)  # unset: where this vitpipe is installed (editable: the checkout)
    assert project_directory({"VITPIPE_HOME": str(ROOT)}) == str(ROOT)
    with pytest.raises(StepError, match=rf"VITPIPE_HOME={tmp_path} does not hold pipeline/flows.py; set VITPIPE_HOME"):
        project_directory({"VITPIPE_HOME": str(tmp_path)})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITPIPE_HOME", str(ROOT))
    assert set_project_directory() == {"directory": str(ROOT)} and Path.cwd() == ROOT


def _k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def _work_pool_job() -> dict:
    """The Job a `kubernetes` worker of our pools creates: the template rendered with its defaults by Prefect."""
    import json

    from prefect.utilities.templating import apply_values

    template = json.loads((DEPLOY / "k8s" / "work-pool-template.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    defaults.update(name="flow-run", command=["prefect", "flow-run", "execute"],
                    env=[{"name": "PREFECT__FLOW_RUN_ID", "value": "x"}])  # as the worker fills them
    return apply_values(template["job_configuration"], defaults)["job_manifest"]


K8S_VERSION = "1.30"


def test_k8s_manifests_validate_against_kubernetes_schemas():
    """Every document in deploy/k8s/ (and the work pool's Job) against the Kubernetes JSON schemas that
    kubernetes-validate ships (strict: unknown fields fail), offline."""
    import kubernetes_validate

    docs = [(f"{name}[{i}]", d) for name, ds in _k8s_docs().items() for i, d in enumerate(ds)]
    docs.append(("work-pool-template.json (rendered Job)", _work_pool_job()))
    assert len(docs) >= 9
    for where, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(f"deploy/k8s/{where} ({doc['kind']}): {err.message} at {list(err.path)}") from None


def test_k8s_work_pool_template_runs_the_vitpipe_image():
    job = _work_pool_job()
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "vitpipe:latest" and job["metadata"]["namespace"] == "vitpipe"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"
    assert container["envFrom"] == [{"secretRef": {"name": "vitpipe-s3"}}]
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("prefect-kubernetes") for req in extras["k8s"])
    from prefect_kubernetes.worker import KubernetesWorker  # the worker type the k8s workers start

    assert KubernetesWorker.type == "kubernetes"


def test_one_secret_layout_everywhere():
    """k8s reads the S3 credentials only from the vitpipe-s3 Secret, under the names the docs create it
    with and compose sets: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    header = (DEPLOY / "k8s" / "prefect-worker.yaml").read_text()
    created = re.search(r"create secret generic (\S+) (.+)", header)
    assert created.group(1) == "vitpipe-s3" and set(re.findall(r"--from-literal=(\w+)=", created.group(2))) == keys
    refs = []

    def walk(obj):
        if isinstance(obj, dict):
            if "secretRef" in obj:
                refs.append((obj["secretRef"]["name"], None))
            if "secretKeyRef" in obj:
                refs.append((obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(_k8s_docs())
    walk(_work_pool_job())
    assert refs and {name for name, _ in refs} == {"vitpipe-s3"} and {k for _, k in refs if k} <= keys
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert keys <= set(compose["x-s3-env"])


def test_compose_validates_against_the_compose_spec():
    """deploy/compose.yaml against the Compose Specification's JSON schema (shipped by check-jsonschema)."""
    import importlib.resources
    import json

    import jsonschema

    schema = json.loads(importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_compose_creates_the_bucket_its_workers_write_to():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    workers = {name: svc for name, svc in compose.items() if svc.get("entrypoint") == ["prefect"] and "worker" in svc["command"]}
    buckets = {svc["environment"]["VITPIPE_ROOT"].removeprefix("s3://").split("/")[0] for svc in workers.values()}
    assert buckets == {"vitpipe"}
    script = compose["bucket"]["command"][0]
    assert 'create_bucket(Bucket="vitpipe")' in script
    compile(script, "compose.yaml:bucket", "exec")  # the one-shot is valid Python
    for svc in workers.values():
        assert svc["depends_on"]["bucket"] == {"condition": "service_completed_successfully"}


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
        if argv[:2] == ["python", "-c"]:  # the bucket one-shot (test_compose_creates_the_bucket...)
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
        if words == ("deploy",):
            assert sub[sub.index("--prefect-file") + 1] == "deploy/prefect.yaml"
    assert pools_in_yaml <= pools_served, "a work pool of prefect.yaml has no worker"
    for stack, cmds in (("compose.yaml", _commands(compose)), ("k8s/prefect-worker.yaml", _commands(docs))):
        served = {argv[argv.index("--pool") + 1] for argv in cmds if "--pool" in argv}
        assert pools_in_yaml <= served, f"{stack}: no worker for the work pool(s) {sorted(pools_in_yaml - served)}"


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
