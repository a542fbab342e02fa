"""cluster.yaml (AWS) and examples/cluster-gcp.yaml pass Ray's own autoscaler schema validation
offline, pin the image to the Ray and Python this client runs, and install the client's lock."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


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
