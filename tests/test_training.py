"""Crop sampling, training, checkpoint/resume bit for bit after SIGKILL, and tiled inference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from rsanet.inference import predict_volume
from rsanet.training import CropSampler, TrainConfig, learning_rate, load_model, save_model, train
from rsanet.volumes import Preprocessed


def _subjects(n=3, shape=(12, 20, 18), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        les = np.zeros(shape, np.uint8)
        c = rng.integers([2, 4, 4], [10, 16, 14])
        les[c[0] - 1 : c[0] + 1, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = 1
        img = rng.normal(0, 1, (3,) + shape).astype(np.float32)
        img[2][les > 0] += 3.0  # bright on FLAIR
        out.append(Preprocessed(img, les, np.ones(shape, np.uint8), (3.0, 1.4, 1.4),
                                np.array([[0, s] for s in shape]), shape, np.eye(4)))
    return out


def test_crop_sampler_shapes_and_lesion_rate():
    big = _subjects(shape=(16, 40, 40))
    s = CropSampler(big, (8, 8, 8), lesion_prob=1.0, seed=0)
    x, y = s.batch(16)
    assert x.shape == (16, 3, 8, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16, 8, 8, 8) and y.dtype == torch.int64
    assert all(int(y[i].sum()) > 0 for i in range(16))  # every crop holds lesion
    uniform = CropSampler(big, (8, 8, 8), lesion_prob=0.0, seed=0)
    frac_l = float(s.batch(64)[1].float().mean())
    frac_u = float(uniform.batch(64)[1].float().mean())
    assert frac_l > 3 * frac_u


def test_crop_sampler_pads_small_volumes():
    s = CropSampler(_subjects(shape=(6, 20, 18)), (8, 16, 16), lesion_prob=0.5, seed=0)
    x, _ = s.batch(2)
    assert x.shape == (2, 3, 8, 16, 16)



def test_deterministic_kernels_switch_them_on_without_importing_torch_compile():
    # a fresh interpreter: the switch must not pull in TorchDynamo/Inductor (1.2-1.4 s per job)
    code = ("import sys, torch; from rsanet.training import deterministic_kernels; deterministic_kernels(); "
            "print(torch.are_deterministic_algorithms_enabled(), 'torch._inductor.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


def test_crop_sampler_keeps_large_volumes_without_copies():
    subjects = _subjects(shape=(16, 40, 40))
    s = CropSampler(subjects, (8, 8, 8), lesion_prob=0.5, seed=0)
    assert all(a is p.image for a, p in zip(s.images, subjects))
    assert all(m is p.lesions for m, p in zip(s.masks, subjects))

CFG = dict(widths=(4, 8), crop=(8, 16, 16), batch_size=2, iterations=8, checkpoint_every=2,
           log_every=2, deterministic=True, device="cpu", seed=3)


def test_learning_rate_schedules():
    const = TrainConfig(variant="unet3d", lr=2e-3, iterations=10)
    assert [learning_rate(const, i) for i in (1, 5, 10)] == [2e-3] * 3
    cos = TrainConfig(variant="unet3d", lr=2e-3, iterations=10, lr_schedule="cosine")
    rates = [learning_rate(cos, i) for i in range(1, 11)]
    assert rates[0] == pytest.approx(2e-3)
    assert rates[5] == pytest.approx(1e-3)  # half way: iteration 6 of 10
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < 0.03 * 2e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(variant="unet3d", lr_schedule="step")


def test_cosine_schedule_is_what_training_uses_and_survives_resume(tmp_path, monkeypatch):
    cfg = TrainConfig(variant="unet3d", **{**CFG, "lr_schedule": "cosine"})
    full = train(cfg, _subjects())
    assert [r["lr"] for r in full.log_rows] == pytest.approx([learning_rate(cfg, i) for i in range(1, 9)])
    # stop at iteration 4 (a checkpoint), resume: the same rates and weights as without stopping
    ckpt = tmp_path / "ckpt.pt"
    short = TrainConfig(**{**cfg.__dict__, "checkpoint_every": 4})
    import rsanet.training as T

    real = T._save_checkpoint

    def stop_after_first(path, payload):
        real(path, payload)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(T, "_save_checkpoint", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            train(short, _subjects(), checkpoint=ckpt)
    resumed = train(short, _subjects(), checkpoint=ckpt)
    assert resumed.resumed_from == 4
    assert [r["lr"] for r in resumed.log_rows] == pytest.approx([r["lr"] for r in full.log_rows])
    for k, v in full.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k


def test_training_logs_every_iteration_and_learns_something():
    cfg = TrainConfig(variant="rsa-111", **{**CFG, "iterations": 30, "lr": 3e-3})
    res = train(cfg, _subjects(), threads=1)
    assert [r["iteration"] for r in res.log_rows] == list(range(1, 31))
    losses = np.array([r["loss"] for r in res.log_rows])
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:5].mean()
    assert 0 < res.r < 0.1
    # the RSA alphas moved away from zero: the attention is being used
    alphas = [v for k, v in res.state_dict.items() if k.endswith("alpha")]
    assert alphas and all(a.abs().sum() > 0 for a in alphas)


def test_saved_model_reloads_and_predicts(tmp_path):
    cfg = TrainConfig(variant="ncl-010", **{**CFG, "iterations": 2})
    res = train(cfg, _subjects(), threads=1)
    save_model(res, cfg, tmp_path / "m.pt")
    model, cfg2 = load_model(tmp_path / "m.pt")
    assert cfg2 == cfg
    prob = predict_volume(model, _subjects(1)[0].image, tile=None, overlap=0.25)
    assert prob.shape == (12, 20, 18) and (prob >= 0).all() and (prob <= 1).all()


def test_tiled_prediction_matches_whole_volume_for_a_pointwise_model():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(3, 2, 1).eval()
    img = np.random.default_rng(0).normal(size=(3, 11, 17, 13)).astype(np.float32)
    whole = predict_volume(model, img, tile=None, overlap=0.25)
    tiled = predict_volume(model, img, tile=(4, 8, 6), overlap=0.5)
    assert np.allclose(whole, tiled, atol=1e-6)


def test_tiles_cover_the_volume_with_the_fewest_evenly_spread_tiles():
    """Tiles cover every voxel, neighbours overlap by at least the policy's fraction and by about the
    same amount, and one tile fewer could not do it (113 voxels by tiles of 64 at overlap 0.25:
    starts 0, 25, 49, not 0, 48, 49)."""
    import math

    from rsanet.inference import tile_corners, tile_starts

    assert tile_starts(113, 64, 48) == [0, 25, 49]
    assert tile_starts(54, 16, 12) == [0, 10, 19, 29, 38]
    assert tile_starts(64, 64, 48) == [0] and tile_starts(40, 64, 48) == [0] and tile_starts(65, 64, 48) == [0, 1]
    for size in range(16, 160):
        for tile, overlap in ((16, 0.25), (64, 0.25), (64, 0.2), (16, 0.0), (64, 0.5)):
            if size < tile:
                continue
            step = max(int(round(tile * (1 - overlap))), 1)
            starts = tile_starts(size, tile, step)
            assert starts[0] == 0 and starts[-1] == size - tile
            gaps = [b - a for a, b in zip(starts[:-1], starts[1:])]
            assert all(0 < g <= step for g in gaps), (size, tile, starts)
            assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread
            assert len(starts) == 1 or math.ceil((size - tile) / step) == len(starts) - 1  # the fewest
    assert len(tile_corners((54, 142, 113), (16, 64, 64), 0.25)) == 45
    assert len(tile_corners((54, 142, 113), (16, 64, 64), 0.2)) == 4 * 3 * 2


def test_tiles_are_spread_evenly_over_the_passes():
    """45 tiles at 4 per pass run as passes of 3-4 tiles, never a pass of one (a slow CPU path)."""
    sizes = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            sizes.append(x.shape[0])
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    img = np.zeros((3, 54, 142, 113), dtype=np.float32)  # 5 x 3 x 3 tiles of 16x64x64
    predict_volume(Recorder(), img, tile=(16, 64, 64), overlap=0.25, batch_size=4)
    assert sum(sizes) == 45 and len(sizes) == 12 and min(sizes) == 3 and max(sizes) == 4


def test_passes_never_hold_a_single_tile_and_batching_does_not_change_the_result():
    from rsanet.inference import pass_sizes

    assert sorted(set(pass_sizes(45, 4))) == [3, 4]
    assert sum(pass_sizes(45, 4)) == 45 and len(pass_sizes(45, 4)) == 12
    by2 = pass_sizes(45, 2)
    assert sum(by2) == 45 and set(by2) <= {2, 3} and len(by2) == 22
    assert pass_sizes(5, 1) == [1] * 5 and pass_sizes(1, 4) == [1] and pass_sizes(3, 2) == [3]
    torch.manual_seed(0)
    from rsanet.models import build_model

    model = build_model("unet3d", widths=(4, 8), dropout=0.0).eval()
    img = np.random.default_rng(1).normal(size=(3, 13, 20, 18)).astype(np.float32)
    probs = [predict_volume(model, img, tile=(8, 8, 8), overlap=0.25, batch_size=b, amp=False) for b in (1, 2, 4)]
    assert np.allclose(probs[0], probs[1], atol=1e-6) and np.allclose(probs[0], probs[2], atol=1e-6)


def test_prediction_policy_from_the_config_and_its_mirroring():
    """The one inference policy: predict.tile null = the training crop, "whole" = one pass, a list
    = that tile; mirroring averages the predictions of the flipped copies, mapped back."""
    from rsanet.inference import PredictionPolicy

    section = {"tile": None, "overlap": 0.25, "blending": "gaussian", "batch_size": 4}
    assert PredictionPolicy.from_config(section, [16, 64, 64]).tile == (16, 64, 64)
    assert PredictionPolicy.from_config({**section, "tile": "whole"}, [16, 64, 64]).tile is None
    assert PredictionPolicy.from_config({**section, "tile": [8, 32, 32]}, [16, 64, 64]).tile == (8, 32, 32)
    with pytest.raises(KeyError, match="batch_size"):  # no second copy of the schema's defaults
        PredictionPolicy.from_config({"tile": None, "overlap": 0.25, "blending": "gaussian"}, [16, 64, 64])
    # the attention maps of one pass: none for the U-Net; NCL's grow with the tile, not the volume
    tiled = PredictionPolicy.from_config(section, [16, 64, 64])
    assert tiled.pass_bytes("unet3d", [8, 16, 32, 64], (40, 120, 100)) == 0
    assert tiled.pass_bytes("ncl-010", [8, 16, 32, 64], (40, 120, 100)) == \
        tiled.pass_bytes("ncl-010", [8, 16, 32, 64], (80, 240, 200)) > 0

    torch.manual_seed(0)
    model = torch.nn.Conv3d(3, 2, 3, padding=1).eval()  # not mirror-symmetric: the flips differ
    img = np.random.default_rng(0).normal(size=(3, 9, 12, 10)).astype(np.float32)
    plain = PredictionPolicy(tile=None, amp=False)
    mirrored = PredictionPolicy(tile=None, amp=False, mirror=True)
    copies = [plain.predict(model, img)] + [
        np.flip(plain.predict(model, np.flip(img, axis).copy()), axis - 1) for axis in (1, 2, 3)]
    assert np.allclose(mirrored.predict(model, img), np.mean(copies, axis=0), atol=1e-6)
    assert not np.allclose(copies[0], copies[1], atol=1e-3)
    assert "mirrored" in mirrored.describe() and "whole volume" in plain.describe()


def test_bf16_only_where_the_device_computes_it(monkeypatch):
    from rsanet import devices

    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not devices.bf16_native(torch.device("cpu"))
    assert devices.precision(True, torch.device("cpu")) == "float32"
    # AVX512-BF16 without AMX: float32 (bf16 trainings diverged on such a CPU; devices.bf16_native)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert not devices.bf16_native(torch.device("cpu"))
    monkeypatch.setattr(devices, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert devices.bf16_native(torch.device("cpu"))
    assert devices.precision(True, torch.device("cpu")) == "bf16 autocast"
    assert devices.precision(False, torch.device("cpu")) == "float32"
    assert devices.bf16_native(torch.device("cuda")) and not devices.bf16_native(torch.device("meta"))


_RUNNER = textwrap.dedent(
    """
    import pickle, sys, time
    import torch
    from rsanet import training
    cfg, subjects, ckpt, partial = pickle.load(open(sys.argv[1], "rb"))
    # Slow each step down so the parent can kill the process mid-run.
    original = torch.optim.Adam.step
    def slow_step(self, *a, **k):
        time.sleep(0.3)
        return original(self, *a, **k)
    torch.optim.Adam.step = slow_step
    training.train(cfg, subjects, checkpoint=ckpt, partial_log=partial, threads=1)
    """
)


def test_killed_training_resumes_to_identical_weights(tmp_path):
    """SIGKILL mid-run, resume from the checkpoint: same weights and log as an uninterrupted run."""
    import pickle

    cfg = TrainConfig(variant="rsa-101", **CFG)
    subjects = _subjects()
    reference = train(cfg, subjects, threads=1)

    ckpt, partial = tmp_path / "ckpt.pt", tmp_path / "partial.csv"
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((cfg, subjects, str(ckpt), str(partial))))
    script = tmp_path / "run.py"
    script.write_text(_RUNNER)
    proc = subprocess.Popen([sys.executable, str(script), str(args)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        # wait until the checkpoint at iteration 4 exists and iteration 5 is under way
        while time.time() < deadline:
            lines = partial.read_text().splitlines() if partial.exists() else []
            if len(lines) - 1 >= 5 and ckpt.exists():
                break
            assert proc.poll() is None, "training subprocess ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("training subprocess made no progress in 120 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not list(tmp_path.glob(".ckpt*"))  # no half-written checkpoint left behind
    saved = torch.load(ckpt, weights_only=True)
    assert 2 <= saved["iteration"] < cfg.iterations

    resumed = train(cfg, subjects, checkpoint=ckpt, threads=1)
    assert resumed.resumed_from == saved["iteration"]
    for key, value in reference.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert [r["loss"] for r in resumed.log_rows] == [r["loss"] for r in reference.log_rows]


def test_checkpoint_of_another_config_is_ignored(tmp_path):
    cfg = TrainConfig(variant="unet3d", **{**CFG, "iterations": 3})
    ckpt = tmp_path / "c.pt"
    torch.save({"config": {"variant": "other"}, "iteration": 2}, ckpt)
    res = train(cfg, _subjects(), checkpoint=ckpt, threads=1)
    assert res.resumed_from == 0 and len(res.log_rows) == 3


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this test checks the CPU-only message")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        train(TrainConfig(variant="unet3d", **{**CFG, "device": "cuda"}), _subjects())


# ---------------------------------------------------------------------------------------------
# Trainings that learn (docs/models.md, "The output bias"), and a study that knows when one did not
# ---------------------------------------------------------------------------------------------
def test_every_batch_holds_a_lesion_crop_with_min_lesion_crops():
    subjects = _subjects(shape=(16, 40, 40))
    forced = CropSampler(subjects, (8, 8, 8), lesion_prob=0.0, seed=1, min_lesion=1)
    loose = CropSampler(subjects, (8, 8, 8), lesion_prob=0.0, seed=1)
    assert all(int(forced.batch(2)[1][0].sum()) > 0 for _ in range(50))  # the first crop, always
    assert sum(int(loose.batch(2)[1][0].sum()) > 0 for _ in range(50)) < 40  # by chance only
    with pytest.raises(ValueError, match="min_lesion_crops"):
        TrainConfig(variant="unet3d", batch_size=2, min_lesion_crops=3)


def test_cosine_schedule_ends_at_its_floor():
    cfg = TrainConfig(variant="unet3d", lr=2e-3, iterations=100, lr_schedule="cosine", lr_floor=0.1)
    rates = [learning_rate(cfg, i) for i in range(1, 101)]
    assert rates[0] == pytest.approx(2e-3) and rates[-1] == pytest.approx(2e-4, rel=0.01)
    assert min(rates) >= 2e-4 - 1e-12
    assert rates[50] == pytest.approx(2e-4 + 0.5 * 1.8e-3, rel=1e-3)


def test_check_iterations_end_at_the_last_iteration():
    from rsanet.training import check_iterations

    assert check_iterations(120, 4) == [30, 60, 90, 120]
    assert check_iterations(3, 4) == [1, 2, 3]
    assert check_iterations(800, 1) == [800]


def test_health_check_passes_a_training_that_learns_and_logs_its_scores():
    """A bright-blob problem a tiny U-Net learns in 40 iterations: the verdict is 'learned', the
    log has the batch Dice, predicted fraction and the health scores at the check points."""
    cfg = TrainConfig(variant="unet3d", **{**CFG, "iterations": 40, "lr": 1e-2, "lesion_crop_prob": 0.8,
                                           "min_lesion_crops": 1, "lesion_weight": 0.9, "dice_weight": 1.0})
    res = train(cfg, _subjects(n=4, seed=1), validation=_subjects(n=2, seed=2), threads=1)
    scored = [r for r in res.log_rows if r.get("health_score", "") != ""]
    assert [r["iteration"] for r in scored] == [10, 20, 30, 40]
    assert res.health["source"] == "validation patches"
    assert res.health["learned"] and res.health["score"] >= 0.2, res.health
    assert all(0 <= r["predicted_lesion_fraction"] <= 1 for r in res.log_rows)
    assert any(r["batch_dice"] != "" and r["batch_dice"] > 0.2 for r in res.log_rows[-10:])


def test_a_training_that_cannot_learn_stops_early_with_on_failure_fail(tmp_path):
    """lr 0: the network never changes. With on_failure: fail the run stops at the first check from
    half-way on (iteration 20 of 40) with a message naming variant, split, seed and what to change;
    with flag it runs to the end and records the failure."""
    from rsanet.stages.train import train_step
    from rsanet.training import TrainingFailed

    cfg = {**CFG, "iterations": 40, "lr": 0.0, "lesion_weight": 0.9, "dice_weight": 1.0}
    subjects, val = _subjects(n=3, seed=1), _subjects(n=2, seed=2)
    flagged = train(TrainConfig(variant="unet3d", **cfg), subjects, validation=val)
    assert len(flagged.log_rows) == 40 and not flagged.health["learned"] and flagged.health["stopped_at"] is None
    files = {}
    for name, s in [*(("t%d" % i, s) for i, s in enumerate(subjects)), *(("v%d" % i, s) for i, s in enumerate(val))]:
        files[name] = str(tmp_path / f"{name}.npz")
        s.save(files[name])
    (tmp_path / "splits.json").write_text(
        '{"n_train": 5, "splits": [{"train": ["t0", "t1", "t2"], "val": ["v0", "v1"], "test": []}]}')
    with pytest.raises(TrainingFailed) as err:
        train_step("rsa-101", 0, str(tmp_path / "splits.json"), files, {**cfg, "on_failure": "fail", "seed": 0},
                   str(tmp_path / "m.pt"), str(tmp_path / "log.csv"), str(tmp_path / "h.json"),
                   str(tmp_path / "ckpt.pt"), seed_index=1)
    message = str(err.value)
    assert "split 0" in message and "seed index 1" in message and "rsa-101 (seed 1000)" in message
    assert "iteration 20 of 40" in message and "train.lr = 0.0" in message and "on_failure" in message
    assert not (tmp_path / "m.pt").exists()


def test_health_without_validation_scores_lesion_bearing_training_batches():
    cfg = TrainConfig(variant="unet3d", **{**CFG, "iterations": 8, "health_checks": 2})
    res = train(cfg, _subjects())
    assert res.health["source"] == "lesion-bearing training batches"
    assert [c["iteration"] for c in res.health["checks"]] == [4, 8]


def test_attention_check_reports_inert_attention_and_attention_that_acts():
    """docs/models.md, "Attention that learns": the attention check of every attention training. A model whose attention scales
    are 0 (its blocks the identity) is 'attention inert': switching it off changes no voxel. The
    same model with scales set to non-zero values changes its prediction when switched off, and
    the check is not inert. Both restore the model's weights exactly."""
    from rsanet.models import attention_off, attention_scales, build_model
    from rsanet.training import attention_check, validation_patches

    torch.manual_seed(0)
    x, y = validation_patches(_subjects(n=2, seed=2), (8, 16, 16), seed=0)
    for variant in ("rsa-111", "ncl-111"):
        model = build_model(variant, widths=(4, 8, 16), dropout=0.0)
        with torch.no_grad():  # a head that predicts some lesion, so there are voxels to change
            model.head[1].bias[1] = 0.0
        args = (x, y, 2, torch.device("cpu"), torch.contiguous_format, False, 0.01, "validation patches")
        inert = attention_check(model, *args)
        assert inert["inert"] and inert["changed_voxels"] == 0 and inert["predicted_voxels"] > 0
        assert inert["dice_on"] == inert["dice_off"]
        assert all(v == 0.0 for vs in inert["scales"].values() for v in vs)
        with torch.no_grad():
            for p in attention_scales(model):
                p.fill_(2.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        acting = attention_check(model, *args)
        assert not acting["inert"] and acting["changed_voxels"] > 0, acting
        assert acting["changed_share"] >= 0.01
        assert max(v for vs in acting["scales"].values() for v in vs) == pytest.approx(2.0)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # attention_off restored it
        with attention_off(model):
            assert all(float(p.detach().abs().max()) == 0.0 for p in attention_scales(model))
    assert attention_check(build_model("unet3d", widths=(4, 8, 16)), *args) is None


def test_attention_scales_get_their_own_learning_rate():
    """train.attention_lr: the scales leave 0 far faster than at train.lr (Adam moves a parameter
    by about its rate per step), and the check is recorded in the health verdict."""
    from rsanet.models import attention_scale_summary, build_model

    moved = {}
    for lr in (None, 0.05):
        cfg = TrainConfig(variant="rsa-010", **{**CFG, "iterations": 10, "lr": 1e-3, "attention_lr": lr,
                                                "lr_schedule": "constant", "lesion_crop_prob": 0.8})
        res = train(cfg, _subjects(n=3, seed=1), validation=_subjects(n=2, seed=2), threads=1)
        model = build_model("rsa-010", widths=cfg.widths, dropout=cfg.dropout)
        model.load_state_dict(res.state_dict)
        moved[lr] = max(abs(v) for vs in attention_scale_summary(model).values() for v in vs)
        assert "attention" in res.health and "scales" in res.health["attention"]
    assert moved[None] <= 10 * 1e-3 * 1.01  # at most ~lr per step
    assert moved[0.05] > 5 * moved[None]


def test_the_study_and_rsanet_segment_predict_identically(tmp_path):
    """One Predictor: the study's predict step (a study's model.pt) and rsanet-segment (the same
    network in an export) give identical probabilities for the same image, and the study's
    masks are that Predictor's lesions at predict.threshold."""
    import json
    from pathlib import Path

    import nibabel as nib

    from rsanet.checks import load_config
    from rsanet.export import load_predictor
    from rsanet.inference import Predictor
    from rsanet.stages.train import predict_step

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "config" / "config.yaml", root / "workflow" / "schemas" / "config.schema.yaml")
    cfg = TrainConfig(variant="rsa-111", **{**CFG, "iterations": 2})
    (tmp_path / "export").mkdir()
    save_model(train(cfg, _subjects(), threads=1), cfg, tmp_path / "export" / "model_split0_seed0.pt")
    study = Predictor.from_model_files([tmp_path / "export" / "model_split0_seed0.pt"], config["predict"], "cpu")
    subject = _subjects(1, seed=3)[0]
    meta = {"models": ["model_split0_seed0.pt"], "predict": config["predict"],  # as export.json records them
            "training_data": {"spacing_mm": list(subject.spacing)}}
    exported = load_predictor(tmp_path / "export", meta, "cpu")
    assert config["predict"]["spacing"] == "study" and exported.spacing_mm == tuple(subject.spacing)
    # rsanet-segment passes the scan's spacing: a scan at the study's spacing is predicted as the study does
    assert np.array_equal(study.probability(subject.image), exported.probability(subject.image, subject.spacing))
    assert study.threshold == exported.threshold == config["predict"]["threshold"]
    assert study.policy == exported.policy
    # the study's predict step writes exactly that Predictor's lesions
    subject.save(tmp_path / "s1.npz")
    (tmp_path / "splits.json").write_text(json.dumps({"splits": [{"train": [], "val": [], "test": ["s1"]}]}))
    predict_step(str(tmp_path / "export" / "model_split0_seed0.pt"), 0, str(tmp_path / "splits.json"),
                 {"s1": str(tmp_path / "s1.npz")}, str(tmp_path / "pred"), str(tmp_path / "m.csv"),
                 config["predict"], config["evaluation"], device="cpu")
    written = np.asarray(nib.load(tmp_path / "pred" / "s1.nii.gz").dataobj)
    expected = study.lesions(study.probability(subject.image)).astype(np.uint8)
    assert np.array_equal(written, np.asarray(subject.uncrop(expected).dataobj))


def test_a_scan_on_another_grid_is_predicted_at_the_study_spacing_and_mapped_back():
    """predict.spacing study: the image resampled to the study's voxel size, the probabilities
    back onto its own grid (same shape, in [0, 1]); for a voxel-wise network and a smooth image,
    close to predicting on the scan's grid; at the study's own spacing, nothing is resampled."""
    from pathlib import Path

    from rsanet.checks import load_config
    from rsanet.inference import PredictionPolicy, Predictor, grid_shape_at, resample_to_shape

    assert grid_shape_at((10, 40, 41), (3.0, 0.7, 0.7), (3.0, 1.4, 1.4)) == (10, 20, 20)
    ramp = np.broadcast_to(np.linspace(0, 1, 16, dtype=np.float32), (1, 8, 12, 16))
    back = resample_to_shape(resample_to_shape(ramp, (8, 12, 32)), (8, 12, 16))
    assert np.allclose(back[..., 1:-1], ramp[..., 1:-1], atol=1e-5)  # a linear ramp survives, but at the edges
    root = Path(__file__).resolve().parents[1]
    predict = load_config(root / "config" / "config.yaml", root / "workflow" / "schemas" / "config.schema.yaml")["predict"]
    torch.manual_seed(0)
    model = torch.nn.Conv3d(3, 2, 1).eval()
    policy = PredictionPolicy.from_config(predict, (8, 16, 16), amp=False)
    z, y, x = np.meshgrid(*(np.linspace(0, np.pi, n) for n in (10, 40, 36)), indexing="ij")
    image = np.stack([np.sin(z) * np.cos(y), np.cos(x), np.sin(y + x)]).astype(np.float32)  # (3, 10, 40, 36)
    own = Predictor((model,), policy, torch.device("cpu"), 0.5, None)
    study = Predictor((model,), policy, torch.device("cpu"), 0.5, None, spacing_mm=(3.0, 1.4, 1.4))
    p_own = own.per_model(image, (3.0, 0.7, 0.7))
    p_study = study.per_model(image, (3.0, 0.7, 0.7))
    assert p_study.shape == p_own.shape == (1, 10, 40, 36) and p_study.min() >= 0 and p_study.max() <= 1
    assert np.abs(p_study - p_own)[:, :, 2:-2, 2:-2].max() < 0.02 and not np.array_equal(p_study, p_own)
    assert np.array_equal(study.per_model(image, (3.0, 1.4, 1.4)), own.per_model(image, (3.0, 1.4, 1.4)))
