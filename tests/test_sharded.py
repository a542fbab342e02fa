"""Feature-sharded training on Ray (docs/design.md §3): N shards reproduce one process, checkpoints
resume with any shard count, data-parallel replicas average to the doubled batch, bad input fails
before any actor starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import interrupt_cli
from test_cache_produce import config

from clt_ray.errors import ConfigError
from clt_ray.train.checkpoint import load_checkpoint
from clt_ray.train.run import train_from_config


def assert_same_checkpoint(a_path, b_path, atol=1e-5, threshold_atol=None, counters=True):
    a, b = load_checkpoint(a_path, optimizer=True), load_checkpoint(b_path, optimizer=True)
    assert a.state.step == b.state.step and a.state.tokens == b.state.tokens
    assert a.state.data == b.state.data
    if counters:
        assert torch.equal(a.state.tokens_since_fired, b.state.tokens_since_fired)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        scale = max(1.0, float(p.detach().abs().max()))
        tol = threshold_atol if name == "log_threshold" and threshold_atol else atol
        assert (p - q).abs().max() <= tol * scale, (name, float((p - q).abs().max()))
        if tol != atol:
            continue
        for m in ("exp_avg", "exp_avg_sq"):
            ma, mb = a.state.moments[name][m], b.state.moments[name][m]
            assert (ma - mb).abs().max() <= atol * max(1e-3, float(ma.abs().max())), (name, m)


def replica_collectives(group, r: int, replicas: int):
    """In-process stand-in for the replica groups of actors.shard_trainer.make_collectives."""
    from clt_ray.nn.step import Collectives

    reduce = group.reduce_sum(r)

    def mean(ts):
        flat = reduce(torch.cat([t.reshape(-1) for t in ts])) / replicas
        offset = 0
        for t in ts:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    return Collectives(replica_mean=mean, replica_sum=reduce, replicas=replicas)


def short(cfg, steps=8, every=4):
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"steps": steps, "checkpoint_every": every, "keep_checkpoints": 3})})


@pytest.mark.slow
def test_two_shards_one_shard_and_one_process_agree_and_resume_across_shard_counts(
        ray_local, tiny_lm_dir, tmp_path: Path):
    from clt_ray.actors.trainer import train_on_ray

    cfg = short(config(tiny_lm_dir))
    single = train_from_config(cfg, tmp_path / "one", log=lambda s: None, splice=False)
    # the shards decode sparsely (issue 17), the single process densely: same weights to round-off
    sparse = cfg.model_copy(update={"train": cfg.train.model_copy(update={"decoder": "sparse"})})
    two = train_on_ray(sparse, tmp_path / "two", shards=2, cpus_per_worker=0.5, splice=False,
                       log=lambda s: None)
    one = train_on_ray(cfg, tmp_path / "ray1", shards=1, cpus_per_worker=0.5, splice=False,
                       log=lambda s: None)
    assert single.step == two.step == one.step == 8
    assert_same_checkpoint(single.checkpoint, two.checkpoint)
    assert_same_checkpoint(single.checkpoint, one.checkpoint)
    # the driver wrote the shards' metrics and the same final summary
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(yaml.safe_load, lines) if r["kind"] == "train"] == [2, 4, 6, 8]
    assert abs(two.metrics["explained_variance"][0] - single.metrics["explained_variance"][0]) < 1e-4

    # a 2-shard checkpoint resumes in one process, and a 1-process one on 2 shards
    for src, resumed in (("two", "two-then-one"), ("one", "one-then-two")):
        shutil.copytree(tmp_path / src, tmp_path / resumed)
        shutil.rmtree(tmp_path / resumed / "checkpoints" / "step_000000008")
        if resumed == "two-then-one":
            r = train_from_config(cfg, tmp_path / resumed, resume=True, log=lambda s: None,
                                  splice=False)
        else:
            r = train_on_ray(cfg, tmp_path / resumed, shards=2, resume=True, splice=False,
                             cpus_per_worker=0.5, log=lambda s: None)
        assert r.step == 8
        assert_same_checkpoint(single.checkpoint, r.checkpoint)


def test_replicas_average_to_the_doubled_batch():
    """R replicas, each with its share of the batch, averaging gradients = one replica with the
    whole batch (the loss is a mean over tokens), through the same step code."""
    from local_group import LocalGroup

    from clt_ray.config import CLTConfig, LossConfig, OptimConfig
    from clt_ray.nn.clt import CrossLayerTranscoder
    from clt_ray.nn.step import Collectives, make_optimizer, train_step

    cfg = CLTConfig(n_layers=3, d_model=8, n_features=16, init_threshold=0.02)
    loss, optim = LossConfig(preact_coef=1e-3), OptimConfig(max_grad_norm=0.5)
    torch.manual_seed(0)
    x, y = torch.randn(4, 64, 3, 8), torch.randn(4, 64, 3, 8)

    def run(batches, collectives):
        torch.manual_seed(1)
        model = CrossLayerTranscoder(cfg)
        opt = make_optimizer(model, optim)
        for t, (xb, yb) in enumerate(batches):
            train_step(model, opt, xb, yb, step=t, total_steps=4, loss_cfg=loss,
                       optim_cfg=optim, collectives=collectives)
        return model

    whole = run(list(zip(x, y)), Collectives())
    group = LocalGroup(2)

    def replica(r):
        return run([(xb[r * 32:(r + 1) * 32], yb[r * 32:(r + 1) * 32]) for xb, yb in zip(x, y)],
                   replica_collectives(group, r, 2))

    for model in group.run(replica):
        for p, q in zip(whole.parameters(), model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_two_replicas_on_ray_read_disjoint_data_and_average(ray_local, tiny_lm_dir,
                                                             tmp_path: Path):
    """2 replicas × 1 shard on Ray = the same two replicas emulated in one process: replica r
    reads documents r, r + 2, … through its own shuffle buffer (seed + r), both start from
    replica 0's init sample, and their gradients are averaged every step."""
    from clt_ray.actors.trainer import train_on_ray
    from local_group import LocalGroup

    from clt_ray.data import ShuffledSource, lm_blocks, take_tokens
    from clt_ray.lm import load_model
    from clt_ray.nn.clt import CrossLayerTranscoder
    from clt_ray.train.loop import Trainer
    from clt_ray.train.run import check_config

    cfg = short(config(tiny_lm_dir), steps=6, every=6)
    run = train_on_ray(cfg, tmp_path / "dp", replicas=2, cpus_per_worker=0.5, splice=False,
                       log=lambda s: None)
    lm, tok = load_model(cfg.model)
    sources = [ShuffledSource(lm_blocks(lm, tok, cfg.data, cfg.model, heldout=False,
                                        part=(r, 2)), cfg.train.batch_size,
                              cfg.data.shuffle_buffer, seed=cfg.data.seed + r) for r in range(2)]
    init = take_tokens(sources[0], cfg.train.init_tokens)
    batches = [[next(s) for _ in range(6)] for s in sources]
    assert not torch.equal(batches[0][0][0], batches[1][0][0])  # disjoint data
    group = LocalGroup(2)

    def replica(r):
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(CrossLayerTranscoder(check_config(cfg)), loss=cfg.loss,
                          optim=cfg.optim, train=cfg.train, total_steps=6,
                          collectives=replica_collectives(group, r, 2))
        trainer.initialize(iter([init]), init_rate=cfg.clt.init_firing_rate)
        for x, y in batches[r]:
            trainer.train_step(x, y)
        return trainer

    emulated = group.run(replica)
    ray_ckpt = load_checkpoint(run.checkpoint)
    assert ray_ckpt.state.tokens == 2 * 6 * cfg.train.batch_size
    for t in emulated:
        assert torch.equal(t.state.tokens_since_fired, ray_ckpt.state.tokens_since_fired)
        for (name, p), q in zip(t.model.named_parameters(), ray_ckpt.model.parameters()):
            torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=1e-5, msg=name)


def test_bad_shard_counts_and_addresses_fail_before_any_actor(tiny_lm_dir, tmp_path: Path):
    from clt_ray.actors.shard_trainer import feature_range
    from clt_ray.actors.trainer import train_on_ray

    cfg = config(tiny_lm_dir)  # 32 features a layer
    with pytest.raises(ConfigError, match="3 shards do not divide clt.n_features 32"):
        train_on_ray(cfg, tmp_path / "a", shards=3)
    with pytest.raises(ConfigError, match="64 shards for 32 features"):
        train_on_ray(cfg, tmp_path / "a", shards=64)
    with pytest.raises(ConfigError, match="min_shards 4 is not in"):
        train_on_ray(cfg, tmp_path / "a", shards=2, min_shards=4)
    gpu = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cuda"})})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            train_on_ray(gpu, tmp_path / "a", shards=2)
    assert not (tmp_path / "a").exists()
    assert [feature_range(s, 4, 32) for s in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "clt_ray.cli", "train", "--config", str(cfg_path),
                          "--shards", "2", "--address", "127.0.0.1:9", "--run-dir",
                          str(tmp_path / "b")], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "no Ray cluster answers at 127.0.0.1:9" in out.stderr


@pytest.mark.slow
def test_two_shards_train_from_the_producers_stream_like_one_process(ray_local, tiny_lm_dir,
                                                                     tmp_path: Path):
    """Rank 0 pulls blocks from its own CacheProducer actors: the same int8 stream, so the same
    weights as one process reading ProducerBlocks."""
    from clt_ray.actors.cache_producer import ProducerBlocks
    from clt_ray.actors.trainer import train_on_ray

    cfg = short(config(tiny_lm_dir, source="producers", producers=1, producer_cpus=0.25),
                steps=6, every=6)
    two = train_on_ray(cfg, tmp_path / "two", shards=2, cpus_per_worker=0.5, splice=False,
                       log=lambda s: None)
    one = train_from_config(cfg, tmp_path / "one", log=lambda s: None, splice=False,
                            blocks=ProducerBlocks(cfg.model, cfg.data))
    assert two.step == one.step == 6
    assert_same_checkpoint(one.checkpoint, two.checkpoint)
    cursor = load_checkpoint(two.checkpoint).state.data["start"]  # the producers' cursor, which
    assert cursor["next_block"][0] > 0 and cursor["turn"] == 0    # assert_same_checkpoint compared


@pytest.mark.slow
def test_ctrl_c_stops_a_sharded_run_and_its_shards(ray_local, tiny_lm_dir, tmp_path: Path):
    """Ctrl-C in `clt-ray train --shards 2` (a driver of its own on the session's Ray) ends the
    run with exit code 130 and a pointer to --resume; the shard workers go with the driver
    (ray_local checks every CPU is free again). A KeyboardInterrupt raised inside ray.get was
    once lost and the run went on to its end."""
    import json

    raw = config(tiny_lm_dir).model_dump(mode="json")
    raw["train"].update(steps=100_000, log_every=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    address = ray_local.get_runtime_context().gcs_address
    metrics = run / "metrics.jsonl"
    rc, stdout, stderr = interrupt_cli(
        ["train", "--config", str(path), "--run-dir", str(run), "--shards", "2", "--address",
         address], lambda: metrics.is_file() and any(
            json.loads(line)["kind"] == "train" for line in metrics.read_text().splitlines()))
    assert rc == 130, stdout[-2000:] + stderr[-2000:]
    assert "--resume" in stdout + stderr and "Traceback" not in stderr, stderr[-2000:]
