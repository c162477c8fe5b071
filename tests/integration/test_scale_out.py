"""Scale-out on the real engines: two rollout workers and a two-rank ZeRO-3 trainer run
through the CLI on a Ray cluster started apart from the run (`cluster.address`), with the
broadcast transport, delta sync and buckets smaller than the model; and the two weight
transports leave an engine with the very same weights."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.integration.test_e2e import grove

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster of two CPUs, started as `ray start --head` would be on a
    cluster's head node; yields its address. Its own temp folder keeps it out of other
    processes' `ray.init()` (which would otherwise find it), and it is stopped by killing
    its own processes, never by `ray stop` (which stops every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="/tmp/rgt")  # short: Ray's socket paths must stay under 107 characters
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
           f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not Path(temp, "ray_current_cluster").exists():  # written once the head is up
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        procs = psutil.Process(head.pid).children(recursive=True) + [psutil.Process(head.pid)]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        subprocess.run(["rm", "-rf", temp], check=False)


def test_two_workers_and_a_two_rank_zero3_trainer_on_a_ray_cluster(tmp_path, model_path, ray_cluster, monkeypatch):
    """The whole loop with every scale-out part at once. Synchronous (η = 0), so every
    trained token was sampled by the weights the trainer holds when it trains on it: the
    trainer's own recomputed logprobs of each step's tokens, from both engines, must equal
    the engines' within 1e-4 (after every sync; through the ratio π_trainer/π_engine)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the cluster's token is ~/.ray/auth_token (the head made or used it)
    out = grove(["run_name=scale", f"cluster.address={ray_cluster}", "rollout.num_workers=2",
                 "trainer.world_size=2", "trainer.zero_stage=3", "cluster.rollout_cpus=0.5",
                 "cluster.trainer_cpus=0.5", "trainer.total_steps=3", "trainer.batch_groups=4", "eval.max_rows=20",
                 "eval.every_steps=0", "logger=none", "buffer.max_staleness=0", "weight_sync.transport=broadcast",
                 "weight_sync.delta=true", "weight_sync.bucket_mb=0.25", "rollout.max_restarts=0"], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "trainer_setup_s" in out.stderr and "'lost': 0" in out.stderr
    records = [json.loads(line) for line in (tmp_path / "scale" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert next(r for r in reversed(records) if "ledger/lost" in r)["ledger/lost"] == 0
    for r in steps:
        assert r["rollout/worker0/version"] == r["rollout/worker1/version"] == r["step"]  # both got every version
        assert r["rollout/worker0/tokens_per_s"] > 0 and r["rollout/worker1/tokens_per_s"] > 0
        # |log π_trainer - log π_engine| <= 1e-4 on every trained token: the ratio's max
        # bounds one side, and the mean k3 (≈ δ²/2 per token) the other for every token
        assert r["batch/age_max"] == 0
        assert r["loss/is_weight_max"] <= math.exp(1e-4)
        assert r["loss/mismatch_kl"] <= 1e-4**2 / 2 / r["train/num_tokens"]
        assert r["weight_sync/bytes"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "scale" / "final_model")  # gathered by both ranks
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_run_asking_for_gpus_this_machine_lacks_stops_at_start_naming_them(tmp_path, model_path):
    """Placement groups are reserved before any engine starts: a local Ray without the
    GPUs the profile asks for fails at once, saying what was asked (exit 2)."""
    out = grove(["cluster.trainer_gpus=1", "logger=none", "trainer.total_steps=2"], tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "trainer.world_size=1 x {'CPU': 1.0, 'GPU': 1.0} (cluster.trainer_cpus/trainer_gpus)" in out.stderr
    assert "short of {'GPU': 1.0}" in out.stderr


# --- both transports, the same weights -----------------------------------------------------


def test_broadcast_and_object_store_leave_the_engine_the_same_weights(model_path, engine, loop_thread):
    """A ZeRO-3 trainer (one rank, so its parameters are partitioned and gathered bucket by
    bucket) sends a step's weights to the session's engine over a real gloo group in
    buckets of 64 KiB, several times smaller than the model; then the same weights go as a
    safetensors blob (object_store). The engine's weights, and what it samples with a
    fixed seed, are identical. Delta sync sends nothing when nothing changed."""
    from rollout.broadcast import fusion_unit, plan_from_json
    from tests.integration.test_trainer_ranks import groups_of_several_lengths, make_trainer

    trainer = make_trainer(model_path, zero_stage=3)
    port = _free_port()
    cap_mb = 1 / 16
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        opened = pool.submit(trainer.broadcast_open, "127.0.0.1", port, 2, "gloo", cap_mb, 60, True)
        loop_thread.run(engine.engine.collective_rpc("grove_join_group", args=("127.0.0.1", port, 1, 2, "gloo", 60)))
        plan_json = opened.result(60)
        loop_thread.run(engine.engine.collective_rpc("grove_set_plan", args=(plan_json,)))
        plan = plan_from_json(plan_json)
        total = sum(b.nbytes for b in plan)
        assert len(plan) >= 8 and total > 8 * cap_mb * 2**20
        for b in plan:  # the cap holds, except for one fusion unit larger than it, alone
            assert b.nbytes <= cap_mb * 2**20 or len({fusion_unit(n) for n in b.names}) == 1

        def broadcast(version: int) -> dict:
            ticket = trainer.broadcast_ticket(version)
            sending = pool.submit(trainer.broadcast_send, ticket)
            loop_thread.run(engine.aload_weights(ticket, version))
            sent = sending.result(60)
            assert sent["bytes"] == ticket["bytes"]
            return ticket

        def seeded_samples() -> list:
            ids = [3, 4, 12, 5, 6]
            return [loop_thread.run(engine.agenerate(ids, 8, temperature=1.0, seed=100 + i)).logprobs
                    for i in range(4)]

        first = broadcast(1)
        assert first["complete"] and first["bytes"] == total  # delta's first version: everything
        assert broadcast(2)["buckets"] == []  # nothing changed, nothing travels
        trainer.train_step(groups_of_several_lengths())
        after_step = broadcast(3)
        by_broadcast = loop_thread.run(engine.aweights_digest()), seeded_samples()
        blob = trainer.export_weights()
        loop_thread.run(engine.aload_weights(blob, 4))
        by_object_store = loop_thread.run(engine.aweights_digest()), seeded_samples()
    assert by_broadcast == by_object_store
    assert after_step["buckets"]  # the step changed the weights, and they travelled
    print(f"delta sync after one Adam step: {len(after_step['buckets'])} of {len(plan)} buckets changed")
