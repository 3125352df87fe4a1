"""GPU claiming on a multi-GPU workstation (lock files; no GPU needed to test the logic)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from rsanet.gpus import claim_gpu


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _hold(lock_dir, count, started, release, out):
    with claim_gpu(lock_dir, count=count) as gpu:
        out.put((gpu, os.environ.get("CUDA_VISIBLE_DEVICES")))
        started.set()
        release.wait(30)


def test_two_jobs_get_different_gpus_and_a_third_is_refused(tmp_path):
    ctx = mp.get_context("fork")
    started, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    holder = ctx.Process(target=_hold, args=(tmp_path, 2, started, release, out))
    holder.start()
    try:
        assert started.wait(30)
        assert out.get(timeout=5) == (0, "0")
        with claim_gpu(tmp_path, count=2) as gpu:
            assert gpu == 1 and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
            # a third job (its own environment, no CUDA_VISIBLE_DEVICES) finds both cards taken
            os.environ.pop("CUDA_VISIBLE_DEVICES")
            with pytest.raises(RuntimeError, match="all 2 GPUs are in use"):
                with claim_gpu(tmp_path, count=2):
                    pass
            os.environ["CUDA_VISIBLE_DEVICES"] = "1"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    finally:
        release.set()
        holder.join(30)


def test_scheduler_choice_and_single_gpu_are_left_alone(tmp_path, monkeypatch):
    with claim_gpu(tmp_path, count=1) as gpu:
        assert gpu is None and "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with claim_gpu(tmp_path, count=4) as gpu:
        assert gpu is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
