"""Global sampler: coverage per epoch on any W, exact continuation across world sizes."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.augment import center_window, random_resized_crop, sample_keys, train_params
from data_pipeline.feed import SampleFeed
from data_pipeline.ingest import ingest
from data_pipeline.sampler import GlobalSampler, LoaderState, SamplerError

B = 24  # divisible by 1, 2, 3, 4 and 8


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_sample_once_per_epoch(world_size):
    n = 101
    s = GlobalSampler(n, seed=3, global_batch=B)
    assert s.steps_per_epoch == 4
    for epoch in (0, 1):
        seen = []
        for g in range(s.steps_per_epoch):
            parts = [s.rank_slice(epoch, g, r, world_size) for r in range(world_size)]
            assert all(len(p) == B // world_size for p in parts)
            assert np.array_equal(np.concatenate(parts), s.global_batch_at(epoch, g))
            seen.extend(np.concatenate(parts).tolist())
        assert len(seen) == len(set(seen)) == s.steps_per_epoch * B  # last partial batch dropped
        assert set(seen) <= set(range(n))
        slices = s.epoch_rank_slices(epoch, world_size)
        assert np.array_equal(slices.reshape(-1), np.array(seen))


def test_permutation_is_pure_in_seed_and_epoch():
    a, b = GlobalSampler(1000, 7, 10), GlobalSampler(1000, 7, 10)
    assert np.array_equal(a.permutation(2), b.permutation(2))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), GlobalSampler(1000, 8, 10).permutation(0))
    assert np.array_equal(np.sort(a.permutation(5)), np.arange(1000))
    ids = np.arange(1000) * 3 + 11
    c = GlobalSampler(ids, 7, 10)
    assert np.array_equal(c.permutation(2), ids[a.permutation(2)])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(SamplerError, match="not divisible"):
        GlobalSampler(100, 0, 24).rank_slice(0, 0, 0, 5)
    with pytest.raises(SamplerError, match="fewer than one global batch"):
        GlobalSampler(10, 0, 24)
    with pytest.raises(SamplerError, match="outside"):
        GlobalSampler(100, 0, 24).rank_slice(0, 4, 0, 1)


def test_loader_state_round_trips():
    st = LoaderState.from_step(11, steps_per_epoch=4, global_batch=24, seed=5)
    assert st == LoaderState(epoch=2, samples_seen_in_epoch=72, seed=5)
    assert LoaderState.from_dict(st.to_dict()) == st
    assert st.global_step(4, 24) == 11
    with pytest.raises(SamplerError, match="not a multiple"):
        LoaderState(0, 25, 0).global_step(4, 24)
    with pytest.raises(SamplerError, match="missing keys"):
        LoaderState.from_dict({"epoch": 1})


def test_augmentation_depends_only_on_seed_epoch_id():
    ids = np.array([5, 17, 5, 99])
    w, h = np.array([500, 300, 500, 64]), np.array([375, 300, 375, 48])
    p = train_params(0, 3, ids, w, h, num_patches=16)
    q = train_params(0, 3, ids[::-1], w[::-1], h[::-1], num_patches=16)
    for k in p:
        assert np.array_equal(p[k], q[k][::-1])  # batch composition does not matter
        assert np.array_equal(p[k][0], p[k][2])
    r = train_params(0, 4, ids, w, h, num_patches=16)
    assert not np.array_equal(p["mask_noise"], r["mask_noise"])
    assert p["mask_noise"].dtype == np.float32 and p["mask_noise"].shape == (4, 16)
    assert (p["mask_noise"] >= 0).all() and (p["mask_noise"] < 1).all()


def test_random_resized_crop_windows_follow_scale_and_ratio():
    n = 4000
    keys = sample_keys(1, 0, np.arange(n))
    w, h = np.full(n, 500), np.full(n, 375)
    anchor, shape = random_resized_crop(keys, w, h)
    assert (anchor >= 0).all() and (shape > 0).all() and (anchor + shape <= 1).all()
    area = shape[:, 0] * shape[:, 1]
    aspect = shape[:, 0] * 500 / (shape[:, 1] * 375)
    assert area.min() > 0.19 and area.max() <= 1.0 and 0.47 < area.mean() < 0.53  # torchvision: 0.495
    assert aspect.min() > 0.74 and aspect.max() < 1.34
    # Very wide images fall back to a centred crop clamped to the ratio range.
    a2, s2 = random_resized_crop(keys[:50], np.full(50, 4000), np.full(50, 100))
    assert (s2[:, 1] == 1.0).any() and (a2 + s2 <= 1).all()
    ca, cs = center_window(np.array([500]), np.array([375]))
    assert np.allclose(cs[0] * [500, 375], 375 * 224 / 256) and np.allclose(ca + cs / 2, 0.5)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return ingest("synthetic://shapes?n=100&classes=4&size=16&seed=0", out, workers=0, progress=False)


def _global_stream(manifest, state: LoaderState, world_size: int, steps: int) -> list[tuple]:
    """(sample_id, anchor, shape, flip, noise) of `steps` global batches, gathered over ranks."""
    n_steps = 100 // B
    start = state.global_step(n_steps, B)
    feeds = [SampleFeed(str(manifest), mode="train", seed=state.seed, global_batch=B, rank=r,
                        world_size=world_size, start_step=start, num_patches=8) for r in range(world_size)]
    per_rank = B // world_size
    out = []
    for g in range(steps):
        for f in feeds:
            for j in range(per_rank):
                s = f.sample(g * per_rank + j)
                out.append((int(s["sample_id"]), tuple(s["anchor"]), tuple(s["shape"]), int(s["flip"]),
                            s["noise"].tobytes()))
    return out


@pytest.mark.parametrize("w_before,w_after,at_step", [(2, 3, 3), (4, 1, 5), (8, 2, 1), (3, 8, 4)])
def test_resume_on_other_world_size_continues_the_same_sequence(manifest, w_before, w_after, at_step):
    reference = _global_stream(manifest, LoaderState(0, 0, 9), 1, 10)
    before = _global_stream(manifest, LoaderState(0, 0, 9), w_before, at_step)
    state = LoaderState.from_step(at_step, 100 // B, B, seed=9)
    state = LoaderState.from_dict(state.to_dict())  # as a checkpoint would store it
    after = _global_stream(manifest, state, w_after, 10 - at_step)
    assert before + after == reference
    ids = [x[0] for x in reference]
    assert len(set(ids[:96])) == 96 and len(set(ids[96:192])) == 96  # epochs 0 and 1 cover all kept samples
