"""Packed training sequences: segment attention in the models (each segment's logits = the sequence
run alone), the packing of `experiments.mllm.packing` (first-fit-decreasing, layout, images in
token order, fixed rows per stage), the LLaVA loss and gradients packed vs padded, the config key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_decoder

from dfm.models import DecoderConfig, MultimodalConfig, MultimodalModel, VisionConfig
from dfm.models.layers import segment_positions
from experiments.engine.config import ConfigError
from experiments.mllm import packing
from experiments.mllm.config import MultimodalExperimentConfig
from experiments.mllm.modeling import llava_loss

VOCAB, IMG, PAD = 48, 3, 0
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "matmul_precision": "highest"}
VISION = {"image_size": 8, "patch_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_layers": 2,
          "num_heads": 2, "matmul_precision": "highest"}


def mm_model(seed=0) -> MultimodalModel:
    config = MultimodalConfig(vision=VisionConfig(**VISION), text=DecoderConfig(**TEXT), image_token_id=IMG)
    model = nnx.eval_shape(lambda: MultimodalModel(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_raw_value(jnp.asarray(base + 0.2 * rng.standard_normal(var.shape), var.dtype))
    return model


def conversation(rng, length, n_image_tokens=0):
    """`length` random text ids (never IMG or PAD), with one image's `n_image_tokens` at 2.. if asked."""
    ids = rng.integers(IMG + 1, VOCAB, length)
    ids[2:2 + n_image_tokens] = IMG
    return ids.astype(np.int32)


def packed_row(seqs, capacity):
    """One row holding `seqs` end to end, then padding: (tokens, segment_ids, positions, starts)."""
    tokens, segs, pos = np.full(capacity, PAD, np.int32), np.zeros(capacity, np.int32), np.zeros(capacity, np.int32)
    starts, s = [], 0
    for i, q in enumerate(seqs):
        tokens[s:s + len(q)], segs[s:s + len(q)], pos[s:s + len(q)] = q, i + 1, np.arange(len(q))
        starts.append(s)
        s += len(q)
    return tokens[None], segs[None], pos[None], starts


# ------------------------------------------------------------------------------- models
def alone(seqs):
    """The sequences as separate rows, right-padded: under causal attention the first `len(q)`
    logits of a row are those of `q` run alone."""
    out = np.full((len(seqs), max(map(len, seqs))), PAD, np.int32)
    for i, q in enumerate(seqs):
        out[i, :len(q)] = q
    return out


@pytest.mark.parametrize("scan", [False, True])
def test_decoder_segments_equal_each_sequence_alone(scan):
    model = tiny_decoder(DecoderConfig(**TEXT, scan_layers=scan), seed=1)
    rng = np.random.default_rng(0)
    seqs = [conversation(rng, n) for n in (9, 14, 5)]
    tokens, segs, pos, starts = packed_row(seqs, 32)
    np.testing.assert_array_equal(segment_positions(segs), pos)
    logits = np.asarray(model(tokens, segment_ids=segs))        # positions derived from the segments
    single = np.asarray(model(alone(seqs)))
    for i, (q, s) in enumerate(zip(seqs, starts)):
        np.testing.assert_allclose(logits[0, s:s + len(q)], single[i, :len(q)], atol=1e-5)


def test_multimodal_segments_with_images_equal_each_conversation_alone():
    model = mm_model()
    t = model.config.num_image_tokens
    rng = np.random.default_rng(1)
    seqs = [conversation(rng, n, t) for n in (t + 5, t + 11, t + 3)]
    px = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
    tokens, segs, pos, starts = packed_row(seqs, 48)
    logits = np.asarray(model(tokens, px, segment_ids=segs, positions=pos))   # images in token order
    single = np.asarray(model(alone(seqs), px))
    for i, (q, s) in enumerate(zip(seqs, starts)):
        np.testing.assert_allclose(logits[0, s:s + len(q)], single[i, :len(q)], atol=1e-5)


def test_segment_ids_shape_is_checked():
    model = tiny_decoder(DecoderConfig(**TEXT))
    with pytest.raises(ValueError, match="segment_ids: expected shape"):
        model(np.ones((1, 6), np.int32), segment_ids=np.ones((1, 5), np.int32))


# ------------------------------------------------------------------------------- packing
def test_first_fit_decreasing_by_hand_and_invariants():
    # 8 -> bin 0, 7 -> bin 1, 5 -> bin 2, 4 -> bin 2, 3 -> bin 1, 2 -> bin 0 (capacity 10)
    assert packing.first_fit_decreasing([5, 3, 8, 2, 4, 7], 10) == [[2, 3], [1, 5], [0, 4]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.integers(1, 41, rng.integers(1, 30))
        bins = packing.first_fit_decreasing(lengths, 48)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))       # each exactly once
        assert all(lengths[b].sum() <= 48 for b in bins)
        assert len(bins) <= -(-2 * lengths.sum() // 48) + 1                         # first fit: <= 1 half-empty bin
        assert bins == packing.first_fit_decreasing(lengths, 48)                     # deterministic
    with pytest.raises(ValueError, match="lengths"):
        packing.first_fit_decreasing([3, 11], 10)


def test_conversation_lengths_keep_every_target_and_image():
    tokens = np.array([[1, 3, 3, 7, 2, 0, 0], [1, 3, 3, 9, 9, 9, 0], [1, 3, 3, 5, 0, 0, 0]])
    mask = np.zeros_like(tokens, bool)
    mask[0, 3:5] = True
    mask[1, 4:6] = True
    mask[2, 3:5] = True      # the answer's EOS has the padding id (pad == eos)
    np.testing.assert_array_equal(packing.conversation_lengths(tokens, mask, 0, 3), [5, 6, 5])


class FakeBatches:
    def __init__(self, table):
        self.table, self.batch_size = table, table.shape[1]

    def indices(self, step):
        return self.table[step]


def test_pack_batch_layout_images_and_fixed_rows():
    rng = np.random.default_rng(2)
    n, length, t = 12, 20, 4
    lengths = rng.integers(t + 3, length + 1, n)
    tokens = np.full((n, length), PAD, np.int32)
    mask = np.zeros((n, length), bool)
    for i, m in enumerate(lengths):
        tokens[i, :m] = conversation(rng, m, t)
        mask[i, t + 3:m] = True
        mask[i, 0] = True    # never a target in the padded loss: must not become one packed
    table = np.stack([rng.permutation(n)[:6] for _ in range(5)])
    plan = packing.plan_rows(FakeBatches(table), lengths, 5, 40, length, groups=2)
    needed = [max(len(b) for b in packing.group_bins(lengths[r], 40, 2)) for r in table]
    assert plan.rows == 2 * max(needed) and plan.summary()["tokens_per_step_padded"] == 6 * length
    for rows in table:
        px = rows.astype(np.float32)[:, None]           # each image tagged with its conversation
        out = packing.pack_batch(tokens[rows], mask[rows], lengths[rows], px, capacity=40, rows=plan.rows,
                                 groups=2, pad_id=PAD)
        assert out["tokens"].shape == (plan.rows, 40)
        seen, image_order = [], []
        for r in range(plan.rows):
            for s in range(1, out["segment_ids"][r].max() + 1):
                at = np.flatnonzero(out["segment_ids"][r] == s)
                assert np.all(np.diff(at) == 1)        # contiguous, never split
                seq = out["tokens"][r, at]
                i = next(j for j in range(6) if lengths[rows[j]] == len(at) and j not in seen
                         and np.array_equal(tokens[rows[j], :len(at)], seq))
                seen.append(i)
                image_order.append(rows[i])
                assert (i < 3) == (r < plan.rows // 2)   # microbatch slice g holds conversations of group g
                np.testing.assert_array_equal(out["positions"][r, at], np.arange(len(at)))
                np.testing.assert_array_equal(out["mask"][r, at], np.r_[False, mask[rows[i], 1:len(at)]])
            pad = out["segment_ids"][r] == 0
            assert np.all(out["tokens"][r, pad] == PAD) and not out["mask"][r, pad].any()
        assert sorted(seen) == list(range(6))
        np.testing.assert_array_equal(out["pixels"][:, 0], image_order)   # images in packed token order
    with pytest.raises(ValueError, match="rows: group 0 of this step needs"):
        packing.pack_batch(tokens[table[0]], mask[table[0]], lengths[table[0]], table[0], capacity=length,
                           rows=2, groups=2)


def test_stage_of_the_batches_and_batch_mesh_multiple():
    from experiments.engine.batches import EpochBatches
    from experiments.engine.config import MeshSection

    config = MultimodalExperimentConfig.from_dict({"task": "mllm", "stage1": {"steps": 30},
                                                   "stage2": {"steps": 20}}, "x")
    assert packing.stage_steps_of(config, EpochBatches(75, 8, config.seed, "stage1", steps=30)) == (["stage1"], 30)
    assert packing.stage_steps_of(config, EpochBatches(75, 8, config.seed, "dense", steps=20)) == (["dense"], 20)
    assert packing.stage_steps_of(config, EpochBatches(75, 8, config.seed, "dense")) == ([], 30)   # upper bound
    lengths = np.arange(1, 76) % 40 + 1
    plan = packing.plan_rows(EpochBatches(75, 8, 0, "dense"), lengths, 20, 64, 40, groups=2, row_multiple=3)
    most = max(max(len(b) for b in packing.group_bins(lengths[EpochBatches(75, 8, 0, "dense").indices(s)], 64, 2))
               for s in range(20))
    assert plan.rows == 2 * (-(-most // 3) * 3)
    assert packing.batch_rows_multiple(MeshSection()) == 1
    assert packing.batch_rows_multiple(MeshSection(data=-1)) == jax.device_count()


# ------------------------------------------------------------------------------- loss
def test_llava_loss_and_gradients_packed_equal_padded():
    model = mm_model(seed=3)
    t = model.config.num_image_tokens
    rng = np.random.default_rng(4)
    b, length = 4, 24
    lengths = np.array([13, 24, 9, 17])
    tokens = np.full((b, length), PAD, np.int32)
    mask = np.zeros((b, length), bool)
    for i, m in enumerate(lengths):
        tokens[i, :m] = conversation(rng, m, t)
        mask[i, t + 4:m] = True
    px = rng.standard_normal((b, 8, 8, 3)).astype(np.float32)
    padded = {"tokens": tokens, "mask": mask, "pixels": px}
    out = packing.pack_batch(tokens, mask, lengths, px, capacity=40, rows=2, pad_id=PAD)
    assert out["tokens"].size < tokens.size and out["segment_ids"].max() == 2
    grad = nnx.jit(lambda m, batch: nnx.value_and_grad(lambda m: llava_loss(m, batch, None), has_aux=True)(m))
    (loss_a, aux_a), grads_a = grad(model, padded)
    (loss_b, aux_b), grads_b = grad(model, out)
    assert float(aux_a["tokens"]) == float(aux_b["tokens"]) == mask[:, 1:].sum()
    np.testing.assert_allclose(float(loss_b), float(loss_a), atol=1e-5)
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    assert len(flat_a) == len(flat_b) > 10
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5)


# ------------------------------------------------------------------------------- config
def test_max_packed_tokens_is_validated():
    with pytest.raises(ConfigError, match="data.max_packed_tokens: must be 0 .* >= data.max_length"):
        MultimodalExperimentConfig.from_dict({"task": "mllm", "data": {"max_length": 64, "max_packed_tokens": 63}},
                                             "x")
    with pytest.raises(ConfigError, match="data.max_packed_tokens"):
        MultimodalExperimentConfig.from_dict({"task": "mllm", "data": {"max_packed_tokens": -1}}, "x")
    ok = MultimodalExperimentConfig.from_dict({"task": "mllm", "data": {"max_length": 64, "max_packed_tokens": 64}},
                                              "x")
    assert ok.data.max_packed_tokens == 64
