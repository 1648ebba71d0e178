"""cluster/ and jobs/: manifests a KubeRay operator accepts, jobs that exist and load, GPUs that fit.

No Kubernetes here: the KubeRay fields are checked against a trimmed copy of the ray.io/v1
CRD schemas (tests/schemas/), the launcher YAML against the schema Ray ships, the Serve
config against Ray Serve's own schema, the job YAMLs against vpo_ray's config classes.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from vpo_ray import config as vcfg

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
JOBS = REPO / "jobs"
SCHEMA = json.loads((REPO / "tests" / "schemas" / "kuberay-ray.io-v1.json").read_text())

if str(REPO) not in sys.path:  # `jobs` is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))

JOB_CLASS = {
    "build_sft": "GenerateConfig", "build_dpo": "GenerateConfig",
    "train_sft": "TrainConfig", "train_dpo": "TrainConfig",
    "evaluate": "EvalConfig", "benchmark": "BenchConfig", "serve": "ServeConfig",
}  # full_loop.yaml holds `vpo loop` sections (generate/train/sft/dpo): see loop_configs()
JOB_SUBCOMMAND = {
    "build_sft": ["generate", "sft"], "train_sft": ["train", "sft"],
    "build_dpo": ["generate", "dpo"], "train_dpo": ["train", "dpo"],
    "evaluate": ["eval"], "full_loop": ["loop"], "benchmark": ["bench"], "serve": ["serve"],
}
JOB_NAMES = sorted(p.stem for p in JOBS.glob("*.py") if not p.stem.startswith("_"))


def manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def ray_objects(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in manifests() if d.get("apiVersion") == "ray.io/v1" and d.get("kind") == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: RayCluster.spec and RayService.spec.rayClusterConfig."""
    out = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in ray_objects("RayCluster")]
    out += [(f"{p.name}:{d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for p, d in ray_objects("RayService")]
    return out


def pod_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus(container: dict) -> int:
    res = container.get("resources", {})
    limit = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    request = res.get("requests", {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, f"{container['name']}: GPU request != limit"
    return limit


def job_config(name: str):
    return vcfg.load_config(getattr(vcfg, JOB_CLASS[name]), JOBS / f"{name}.yaml")


def rayjob_args(name: str) -> list[str]:
    """The arguments after `python -m jobs.<name>` in cluster/rayjobs/<name>.yaml."""
    job = yaml.safe_load((CLUSTER / "rayjobs" / f"{name}.yaml").read_text())
    return job["spec"]["entrypoint"].split()[3:]


def loop_configs(overrides: tuple[str, ...] = ()) -> list:
    """The four stage configs `vpo loop` builds from jobs/full_loop.yaml and its RayJob's flags,
    the way vpo_ray.train.loop.run_loop builds them."""
    import argparse

    from vpo_ray.train import loop

    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    args = p.parse_args(rayjob_args("full_loop") + list(overrides))
    values, sections = loop.split_overrides(args.overrides, args.config)
    configs = []
    for kind, optimizer in (("sft", None), ("dpo", "/mnt/vpo/runs/loop/round_0/sft/model")):
        configs.append(vcfg.load_config(vcfg.GenerateConfig, None, sections["generate"], **{
            **values["generate"], "kind": kind, "queries": getattr(args, f"{kind}_queries") or args.queries, "out": "o",
            "preset": args.preset,
            "optimizer": optimizer}))
        configs.append(vcfg.load_config(vcfg.TrainConfig, None, sections["train"] + sections[kind], **{
            **values["train"], **values[kind], "method": kind, "data": "d", "out": "o", "preset": args.preset,
            "model": optimizer}))
    return configs


def configs_of(name: str) -> list:
    return loop_configs() if name == "full_loop" else [job_config(name)]


def image_tag() -> str:
    """The tag the README's `docker build` line gives the image."""
    m = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "README.md").read_text())
    assert m, "cluster/README.md has no `docker build -f cluster/Dockerfile -t IMAGE .` line"
    return m.group(1)


# ---------------------------------------------------------------------------- KubeRay manifests

def test_every_manifest_is_yaml_with_a_known_kind():
    docs = manifests()
    assert docs
    known = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"),
             ("v1", "PersistentVolumeClaim")}
    launcher = CLUSTER / "aws.yaml"
    for path, doc in docs:
        if path == launcher or path.name == "bundle.yaml":
            continue
        assert (doc.get("apiVersion"), doc.get("kind")) in known, f"{path.name}: unexpected {doc.get('kind')}"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_fields_exist_in_the_crd_schema(kind):
    objects = ray_objects(kind)
    assert objects, f"no {kind} in cluster/"
    schema = {**SCHEMA, "$ref": f"#/definitions/{kind}"}
    validator = jsonschema.Draft7Validator(schema)
    for path, doc in objects:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{path.relative_to(REPO)}:\n" + "\n".join(errors)


def test_schema_rejects_a_misspelt_field():
    path, doc = ray_objects("RayCluster")[0]
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # missing 's'
    validator = jsonschema.Draft7Validator({**SCHEMA, "$ref": "#/definitions/RayCluster"})
    assert any("maxReplica" in e.message for e in validator.iter_errors(doc))


def test_autoscaling_on_and_gpu_groups_scale_from_zero():
    (_, cluster), = ray_objects("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g["template"]["spec"]["containers"][0])]
    assert len(gpu_groups) >= 2
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], g["groupName"]


# ---------------------------------------------------------------------------- auth and secrets

def test_token_auth_is_on_everywhere():
    for where, spec in cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth off"
        assert spec["authOptions"].get("secretName"), f"{where}: token not from a named Secret"
    for path, job in ray_objects("RayJob"):
        env = {e["name"]: e for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"] for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", path.name
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], path.name
    launcher = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for cmd in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd


SECRET_PATTERNS = [
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),  # hex tokens (ray get-auth-token, openssl rand -hex)
    re.compile(r"(?<![\w/.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/.-])"),  # base64 blobs
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(token|secret|password|api_key|apikey)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}"),
]


def secret_literals(text: str) -> list[str]:
    return [m.group(0) for rx in SECRET_PATTERNS for m in rx.finditer(text)]


def test_secret_scanner_finds_planted_tokens():
    assert secret_literals("RAY_AUTH_TOKEN=3f9a1c0e5b7d42a8b6c1d0e9f8a7b6c5d4e3f2a1")
    assert secret_literals("  value: hf_abcdefghijklmnopqrstuvwxyzABCDEFGH")
    assert secret_literals("token: raycluster_secret_value_1234")
    assert not secret_literals("secretKeyRef: {name: vpo-ray-auth, key: auth_token}")


def test_no_secret_literals_in_cluster_or_jobs():
    found = {}
    for path in [*CLUSTER.rglob("*"), *JOBS.rglob("*")]:
        if path.is_file() and path.suffix in {".yaml", ".yml", ".md", ".py", ""} and "__pycache__" not in path.parts:
            hits = secret_literals(path.read_text())
            if hits:
                found[str(path.relative_to(REPO))] = hits
    assert not found, f"token-like literals: {found}"
    for where, spec in cluster_specs():
        for c in pod_containers(spec):
            for e in c.get("env", []):
                if re.search(r"TOKEN|SECRET|PASSWORD|KEY", e["name"]):
                    assert "valueFrom" in e and "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"


# ---------------------------------------------------------------------------- jobs

def test_a_rayjob_for_every_job_module_and_back():
    entry = re.compile(r"^python -m jobs\.(\w+) --config jobs/(\w+)\.yaml( --?\w.*)?$")
    seen = set()
    for path, job in ray_objects("RayJob"):
        m = entry.match(job["spec"]["entrypoint"])
        assert m and m.group(1) == m.group(2), f"{path.name}: entrypoint {job['spec']['entrypoint']!r}"
        name = m.group(1)
        assert (JOBS / f"{name}.py").is_file() and (JOBS / f"{name}.yaml").is_file(), name
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == ray_objects("RayCluster")[0][1]["metadata"]["name"]
        seen.add(name)
    assert seen == set(JOB_NAMES) == set(JOB_SUBCOMMAND)


@pytest.mark.parametrize("name", JOB_NAMES)
def test_job_yaml_loads_into_its_config_class(name):
    configs = configs_of(name)
    from vpo_ray.models.registry import PRESETS

    for cfg in configs:
        assert cfg.preset == "paper", f"jobs/{name}.yaml: the cluster default is the paper preset"
        assert cfg.preset in PRESETS and "tiny" in PRESETS
    if name == "full_loop":
        tiny = loop_configs(("--preset", "tiny"))
    else:
        tiny = [vcfg.load_config(type(configs[0]), JOBS / f"{name}.yaml", ["preset=tiny"])]
    assert {c.preset for c in tiny} == {"tiny"}


@pytest.mark.parametrize("name", JOB_NAMES)
def test_job_module_hands_subcommand_config_and_overrides_to_the_cli(name, monkeypatch):
    import vpo_ray.cli as cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or 0)
    module = importlib.import_module(f"jobs.{name}")
    assert module.main(["--config", f"jobs/{name}.yaml", "preset=tiny", "ray.num_cpus=2"]) == 0
    sub = JOB_SUBCOMMAND[name]
    if name == "benchmark":  # `vpo bench NAME`: the name comes from the YAML
        sub = [*sub, yaml.safe_load((JOBS / "benchmark.yaml").read_text())["name"]]
    assert calls[0][:len(sub)] == sub and sub[0] in cli.COMMANDS
    rest = calls[0][len(sub):]
    assert rest[0] == "--config" and Path(rest[1]).resolve() == (JOBS / f"{name}.yaml").resolve()
    assert rest[2:] == ["preset=tiny", "ray.num_cpus=2"]


@pytest.mark.parametrize("name", JOB_NAMES)
def test_the_real_cli_parses_what_each_job_hands_it(name):
    """The argv a job builds is one `vpo` accepts (positionals, --config, overrides)."""
    import vpo_ray.cli as cli
    from jobs._entry import build_argv

    module = importlib.import_module(f"jobs.{name}")
    argv = build_argv(module.SUBCOMMAND, module.__file__, ["--config", f"jobs/{name}.yaml", *rayjob_args(name)[2:]],
                      getattr(module, "POSITIONAL", None))
    args = cli.build_parser().parse_args(argv)
    assert Path(args.config).name == f"{name}.yaml"


def test_benchmark_name_override_picks_the_positional(monkeypatch):
    from jobs._entry import build_argv
    from jobs import benchmark

    argv = build_argv(benchmark.SUBCOMMAND, benchmark.__file__, ["name=train-step", "videos=2"], benchmark.POSITIONAL)
    assert argv[:2] == ["bench", "train-step"] and argv[-2:] == ["name=train-step", "videos=2"]


def test_job_config_defaults_to_the_yaml_beside_the_module(monkeypatch, tmp_path):
    import vpo_ray.cli as cli
    from jobs import build_sft

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)  # a RayJob driver may start anywhere
    build_sft.main(["limit=4"])
    assert calls[0] == ["generate", "sft", "--config", str(JOBS / "build_sft.yaml"), "limit=4"]


def test_runtime_env_uploads_the_code_and_not_the_heavy_files(tmp_path):
    from ray._private.runtime_env import packaging

    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and "pip" not in env
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    zip_path = tmp_path / "pkg.zip"
    # gitignore off: the excludes alone must keep the upload small
    packaging.create_package(str(REPO), zip_path, include_gitignore=False, excludes=env["excludes"], logger=None)
    import zipfile

    names = zipfile.ZipFile(zip_path).namelist()
    assert "jobs/build_sft.py" in names and "vpo_ray/cli.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "runs/")) or n.endswith((".mp4", ".safetensors"))]
    assert zip_path.stat().st_size < packaging.GCS_STORAGE_MAX_SIZE


# ---------------------------------------------------------------------------- images, versions, GPUs

def test_one_image_everywhere_matching_dockerfile_and_project_version():
    import ray

    tag = image_tag()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert tag.rsplit(":", 1)[1] == version
    assert f"ARG VPO_VERSION={version}" in dockerfile
    assert f"-t {tag} ." in dockerfile
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    assert ray_version == ray.__version__
    images = {c["image"] for _, spec in cluster_specs() for c in pod_containers(spec)}
    images |= {c["image"] for _, j in ray_objects("RayJob") for c in j["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    images.add(yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]["image"])
    assert images == {tag}
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == ray_version, where
    torch_pin = re.search(r"ARG TORCH_SPEC=torch==(\S+)", dockerfile).group(1)
    from vpo_ray.bundle import DEFAULT_TORCH_SPEC
    assert DEFAULT_TORCH_SPEC == f"torch=={torch_pin}"


def _gpu_groups() -> dict[str, tuple[int, int]]:
    (_, cluster), = ray_objects("RayCluster")
    return {g["groupName"]: (gpus(g["template"]["spec"]["containers"][0]), g["maxReplicas"])
            for g in cluster["spec"]["workerGroupSpecs"]}


def _demand(cfg) -> tuple[float, float]:
    """(largest single actor's GPUs, GPUs when every pool is at its max) for one config."""
    if isinstance(cfg, (vcfg.GenerateConfig, vcfg.EvalConfig)):
        stages = [cfg.rewrite_stage, cfg.judge_stage]
        if isinstance(cfg, vcfg.EvalConfig) or cfg.kind == "dpo":
            stages += [cfg.t2v_stage, cfg.video_judge_stage]
        return max(s.num_gpus for s in stages), sum(s.max_actors * s.num_gpus for s in stages)
    if isinstance(cfg, vcfg.TrainConfig):
        per = 1.0 if cfg.use_gpu else 0.0
        return per, per * cfg.num_workers
    if isinstance(cfg, vcfg.ServeConfig):
        return cfg.num_gpus, cfg.num_gpus * cfg.autoscaling.max_replicas
    return 0.0, 0.0


def _node_types(spec: dict) -> dict[str, dict]:
    """What the KubeRay autoscaler believes each worker group offers (Ray's own parser)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    return {g["groupName"]: _node_type_from_group_spec(g, is_head=False)["resources"]
            for g in spec["workerGroupSpecs"]}


def _requests(cfg) -> list[tuple[str, dict]]:
    """(what, Ray resources of one actor/worker/replica) a job config asks for."""
    def res(cpus, gpus, accelerator):
        out = {"CPU": cpus, "GPU": gpus}
        if accelerator:
            out[f"accelerator_type:{accelerator}"] = 0.001  # how Ray turns accelerator_type into a request
        return out

    if isinstance(cfg, (vcfg.GenerateConfig, vcfg.EvalConfig)):
        names = ["rewrite_stage", "judge_stage"]
        if isinstance(cfg, vcfg.EvalConfig) or cfg.kind == "dpo":
            names += ["t2v_stage", "video_judge_stage"]
        return [(n, res(s.num_cpus, s.num_gpus, s.accelerator_type)) for n in names for s in [getattr(cfg, n)]]
    if isinstance(cfg, vcfg.TrainConfig):
        return [("train worker", res(cfg.cpus_per_worker, 1.0 if cfg.use_gpu else 0.0, cfg.accelerator_type))]
    if isinstance(cfg, vcfg.ServeConfig):
        return [("optimizer replica", res(cfg.num_cpus, cfg.num_gpus, cfg.accelerator_type))]
    return []


@pytest.mark.parametrize("name", ["build_sft", "build_dpo", "train_sft", "train_dpo", "evaluate", "serve",
                                  "full_loop"])
def test_every_request_fits_a_group_the_autoscaler_can_start(name):
    """Each actor, worker and replica (CPU, GPU, GPU model) fits a worker group as Ray's KubeRay
    autoscaler reads it, so asking for it scales that group up from zero."""
    if name == "serve":
        (_, svc), = ray_objects("RayService")
        types = _node_types(svc["spec"]["rayClusterConfig"])
    else:
        (_, cluster), = ray_objects("RayCluster")
        types = _node_types(cluster["spec"])
    for cfg in configs_of(name):
        for what, req in _requests(cfg):
            fits = [g for g, offer in types.items() if all(offer.get(k, 0) >= v for k, v in req.items())]
            assert fits, f"jobs/{name}.yaml {what} asks for {req}; no worker group offers it: {types}"
            if req["GPU"]:
                assert any(k.startswith("accelerator_type:") for k in req), f"{name} {what}: GPU model not pinned"


@pytest.mark.parametrize("name", ["build_sft", "build_dpo", "train_sft", "train_dpo", "evaluate", "serve",
                                  "full_loop"])
def test_job_gpu_needs_fit_the_worker_groups(name):
    groups = _gpu_groups()
    capacity = sum(g * n for g, n in groups.values())
    for cfg in configs_of(name):
        per_actor, total = _demand(cfg)
        assert per_actor > 0, f"jobs/{name}.yaml asks for no GPU on the GPU cluster"
        assert per_actor <= max(g for g, _ in groups.values()), "an actor larger than any pod"
        assert total <= capacity, f"{name} wants {total} GPUs at full scale; the groups reach {capacity}"


def test_training_fits_one_eight_gpu_pod():
    groups = _gpu_groups()
    trainings = [job_config("train_sft"), job_config("train_dpo")]
    trainings += [c for c in loop_configs() if isinstance(c, vcfg.TrainConfig)]
    for cfg in trainings:
        name = f"{cfg.method} training"
        assert cfg.use_gpu and cfg.num_workers in {g for g, _ in groups.values()}, \
            f"{name}: num_workers={cfg.num_workers} matches no pod's GPU count (NVLink inside one pod)"


# ---------------------------------------------------------------------------- Serve

def _serve_app() -> tuple[dict, dict]:
    (_, svc), = ray_objects("RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    return svc, serve_cfg


def test_serve_config_is_valid_for_ray_serve_and_names_the_app():
    from ray.serve.schema import ServeDeploySchema

    svc, serve_cfg = _serve_app()
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "vpo_ray.serve.app:build_app"
    assert app["route_prefix"] == "/"
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # the proxy must take traffic from the Service
    assert "config" not in app["args"], "the settings themselves belong in serveConfigV2, not a file in the image"
    assert all(isinstance(v, str) for v in app["runtime_env"]["env_vars"].values())


def _serve_args_config():
    from vpo_ray.serve.app import config_from_args

    _, serve_cfg = _serve_app()
    return config_from_args(serve_cfg["applications"][0]["args"])


def test_serve_settings_in_the_rayservice_equal_jobs_serve_yaml():
    """`ray job submit -- python -m jobs.serve` and the RayService serve the same thing the same way."""
    assert vcfg.to_dict(_serve_args_config()) == vcfg.to_dict(job_config("serve"))


def test_serve_deployments_block_is_what_the_args_give():
    """Serve applies `deployments:` over the code's options: they must not say something else."""
    from vpo_ray.serve.deployments import deployment_options

    _, serve_cfg = _serve_app()
    given = {d["name"]: d for d in serve_cfg["applications"][0]["deployments"]}
    model_opts, api_opts = deployment_options(_serve_args_config())
    assert set(given) == {"OptimizerModel", "OptimizerAPI"}
    for name, opts in (("OptimizerModel", model_opts), ("OptimizerAPI", api_opts)):
        for key, value in given[name].items():
            if key != "name":
                assert value == opts[key], f"{name}.{key}: serveConfigV2 says {value}, the args give {opts[key]}"
    assert given["OptimizerModel"]["autoscaling_config"] == model_opts["autoscaling_config"]
    assert given["OptimizerModel"]["ray_actor_options"]["accelerator_type"]


def test_serve_deployment_names_exist_in_the_app():
    """A `deployments:` entry naming no deployment of the app fails `serve deploy`."""
    _, serve_cfg = _serve_app()
    named = [d["name"] for d in serve_cfg["applications"][0].get("deployments", [])]
    deployments = importlib.import_module("vpo_ray.serve.deployments")
    from ray.serve import Deployment

    existing = {obj.name for obj in vars(deployments).values() if isinstance(obj, Deployment)}
    assert existing, "no Serve deployment found in vpo_ray.serve.deployments"
    assert set(named) <= existing, f"serveConfigV2 names {named}; the app has {sorted(existing)}"


def test_serve_gpu_group_fits_the_replicas_jobs_serve_yaml_asks_for():
    svc, _ = _serve_app()
    cfg = job_config("serve")
    assert cfg.num_gpus > 0 and cfg.host == "0.0.0.0"
    (group,) = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    per_pod = gpus(group["template"]["spec"]["containers"][0])
    assert cfg.num_gpus <= per_pod
    assert group["minReplicas"] * per_pod >= cfg.autoscaling.min_replicas * cfg.num_gpus
    assert group["maxReplicas"] * per_pod >= cfg.autoscaling.max_replicas * cfg.num_gpus
    env = {e["name"] for c in pod_containers(svc["spec"]["rayClusterConfig"]) for e in c.get("env", [])}
    assert cfg.auth_token_env in env, "the Serve bearer token env var is not set on the pods"


# ---------------------------------------------------------------------------- cluster launcher

def test_cluster_launcher_yaml_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["provider"]["type"] == "aws"
    assert launcher["head_node_type"] in launcher["available_node_types"]
    types = {n["node_config"]["InstanceType"] for n in launcher["available_node_types"].values()}
    assert {"g5.2xlarge", "p4d.24xlarge"} <= types


def test_cluster_launcher_rejects_a_bad_key():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    launcher["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(launcher, schema)
