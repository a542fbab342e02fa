"""cluster.yaml (AWS) and examples/cluster-gcp.yaml pass Ray's own autoscaler schema validation
offline, pin the image to the Ray and Python this client runs, and install the client's lock; runs
and caches live in the user's bucket ($CLT_RAY_BUCKET), never on a node's disk, every node has the
cloud identity that reaches it, and Ray's token authentication is on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"cluster.yaml": "s3", "examples/cluster-gcp.yaml": "gs"}  # file: its store's scheme


def header(path: str) -> str:
    """A config's leading comment (its commands and setup notes), shell continuations joined."""
    lines = []
    for line in (ROOT / path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return re.sub(r"\\\n\s*", "", "\n".join(lines))


def locations(commands: str) -> list[str]:
    return re.findall(r"--(?:run-dir|out) (\S+)", commands)


@pytest.mark.parametrize("path", ["cluster.yaml", "examples/cluster-gcp.yaml"])
def test_cluster_config_is_valid_and_pinned(path):
    config = yaml.safe_load((ROOT / path).read_text())
    validate_config(prepare_config(config))  # defaults filled in as `ray up` does, then jsonschema of Ray's autoscaler: raises on any bad field
    image = config["docker"]["image"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{ray.__version__}-{py}-gpu", image
    workers = config["available_node_types"]
    assert config["head_node_type"] in workers
    gpu = workers["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling
    lock, makefile = (ROOT / "requirements.lock").read_text(), (ROOT / "Makefile").read_text()
    locked_ray = re.search(r"^ray==(\S+)", lock, re.MULTILINE).group(1)
    assert image.startswith(f"rayproject/ray:{locked_ray}-"), (image, locked_ray)
    torch = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE).group(1)
    # exactly the client's versions: the lock (hashes checked), the Makefile's torch, the project
    assert config["setup_commands"] == [
        "pip install --quiet --require-hashes --no-deps -r /home/ray/clt-ray/requirements.lock",
        f"pip install --quiet {torch}",
        "pip install --quiet --no-deps -e /home/ray/clt-ray",
    ]


def test_a_broken_cluster_config_is_rejected():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="zero"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize(("path", "scheme"), CONFIGS.items())
def test_runs_and_caches_live_in_the_users_bucket_and_nodes_share_no_disk(path, scheme):
    text, commands = (ROOT / path).read_text(), header(path)
    assert "export CLT_RAY_BUCKET=" in commands  # the bucket: a variable of the user's shell
    found = locations(commands)
    assert found and all(loc.startswith(f"{scheme}://$CLT_RAY_BUCKET/") for loc in found), found
    config = yaml.safe_load(text)
    # the code and the auth token are all that is copied; nothing is mounted or shared
    assert config["file_mounts"] == {"/home/ray/clt-ray": ".",
                                     "~/.ray/auth_token": "~/.ray/auth_token"}
    commands = [*config["setup_commands"], *config["head_start_ray_commands"],
                *config["worker_start_ray_commands"], *config.get("initialization_commands", [])]
    assert not [c for c in commands if re.search(r"\b(mount|nfs|efs|fuse)\b", c, re.IGNORECASE)]
    assert "/home/ray/runs" not in text and "--run-dir /" not in text


def test_readme_cluster_commands_use_object_store_locations():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## On a cluster"):]
    section = section[:section.index("\n## ", 3)]
    found = locations(re.sub(r"\\\n\s*", "", section))
    assert found and all(re.match(r"(s3|gs)://", loc) for loc in found), found


def test_aws_nodes_have_instance_profiles_with_the_documented_bucket_policy():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Name"]
                for name, node in nodes.items()}
    assert profiles == {"head": "clt-ray-head", "gpu_worker": "clt-ray-worker"}
    notes = header("cluster.yaml")
    policy = json.loads(re.search(r'\{"Version".*?\]\}\]\}', notes, re.DOTALL).group(0))
    allowed = {(a, st["Resource"]) for st in policy["Statement"] for a in st["Action"]}
    assert {("s3:ListBucket", "arn:aws:s3:::BUCKET"), ("s3:GetObject", "arn:aws:s3:::BUCKET/*"),
            ("s3:PutObject", "arn:aws:s3:::BUCKET/*"),
            ("s3:DeleteObject", "arn:aws:s3:::BUCKET/*")} <= allowed
    assert not any(a in ("s3:*", "*") for a, _ in allowed)  # the bucket's objects, nothing more
    assert "iam:PassRole on the role clt-ray-worker" in notes  # the head hands workers theirs


def test_gcp_workers_run_as_a_service_account_with_the_storage_scope():
    config = yaml.safe_load((ROOT / "examples/cluster-gcp.yaml").read_text())
    (account,) = config["available_node_types"]["gpu_worker"]["node_config"]["serviceAccounts"]
    assert account["email"] == (
        f"clt-ray-worker@{config['provider']['project_id']}.iam.gserviceaccount.com")
    assert "https://www.googleapis.com/auth/devstorage.read_write" in account["scopes"]
    assert "roles/storage.objectUser" in header("examples/cluster-gcp.yaml")


@pytest.mark.parametrize("path", CONFIGS)
def test_every_node_starts_ray_with_token_authentication(path):
    config = yaml.safe_load((ROOT / path).read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in header(path)
