"""qjax.quantize on Flax models: numerics vs numpy references, modes, jit/grad/scan/remat/sharding, QAT, Orbax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
import qjax.numerics as qn
from tests import np_reference as ref
from tests.tiny_models import Block, Stack, block_numpy, block_params

D, HEADS, HIDDEN = 256, 4, 512
W8A8 = qjax.Rule(weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8", qn.per_token()))
W4A16 = qjax.Rule(weight=qn.QuantSpec("int4", qn.per_group(0, 128)))
W4A8 = qjax.Rule(weight=qn.QuantSpec("int4", qn.per_group(0, 128)), act=qn.QuantSpec("int8", qn.per_token()))
FP8 = qjax.Rule(weight=qn.QuantSpec("fp8_e4m3", qn.per_axis(1)), act=qn.QuantSpec("fp8_e4m3", qn.per_token()))


@pytest.fixture(scope="module")
def block_and_input():
    block = Block(D, HEADS, HIDDEN, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, D))
    return block, x


CASES = {
    "W8A8": (W8A8, lambda w: ref.int_symmetric(w, 8, axis_keep=(1,)), lambda a: ref.per_token_int(a, 8)),
    "W4A16": (W4A16, lambda w: ref.int_symmetric(w, 4, group=(0, 128)), lambda a: a),
    "W4A8": (W4A8, lambda w: ref.int_symmetric(w, 4, group=(0, 128)), lambda a: ref.per_token_int(a, 8)),
    "FP8": (FP8, lambda w: ref.fp8_e4m3(w, axis_keep=(1,)), lambda a: ref.fp8_e4m3(a, axis_keep=(0, 1))),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["qat", "ptq", "serve"])
def test_transformer_block_matches_numpy_fake_quant_reference(block_and_input, name, mode):
    block, x = block_and_input
    rule, wq, aq = CASES[name]
    qblock = qjax.quantize(block, [rule], mode)
    y = np.asarray(qblock(x), np.float64)
    expected = block_numpy(block_params(block), np.asarray(x, np.float64), HEADS, wq, aq)
    floaty = block_numpy(block_params(block), np.asarray(x, np.float64), HEADS)
    # The quantized output matches the reference far more closely than it matches the float model.
    err = np.abs(y - expected).max()
    gap = np.abs(floaty - expected).max()
    assert err < 2e-3 * np.abs(expected).max(), (err, gap)
    assert err < 0.05 * gap
    if mode != "qat":
        assert all(isinstance(op.kernel.get_value(), qn.QArray) for op in qjax.transforms.quantized_ops(qblock).values())


def test_param_bytes_shrink_with_packing(block_and_input):
    block, _ = block_and_input
    n_float = qjax.param_bytes(block)
    n8 = qjax.param_bytes(qjax.quantize(block, [qjax.Rule(weight=qn.QuantSpec("int8", qn.per_axis(1)))], "ptq"))
    n4 = qjax.param_bytes(qjax.quantize(block, [W4A16], "ptq"))
    weights = 4 * D * D + 2 * D * HIDDEN
    biases = 4 * (5 * D + HIDDEN)
    assert n_float == 4 * weights + biases
    assert n8 == weights + biases + 4 * (4 * D + HIDDEN + D)  # int8 codes + f32 per-channel scales
    assert abs(n4 - (weights / 2 + biases + 4 * weights / 128)) < 1  # 2 codes/byte + one f32 scale per group


def test_original_model_is_untouched_and_skip_rules_work(block_and_input):
    block, x = block_and_input
    y0 = block(x)
    recipe = [qjax.Rule("down", skip=True), W4A16]
    qb = qjax.quantize(block, recipe, "ptq")
    assert isinstance(block.q, nnx.Linear) and isinstance(qb.q, qjax.transforms.QLinear)
    assert isinstance(qb.down, nnx.Linear)
    np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(y0))


def test_unused_rules_are_reported_and_strict_mode_raises(block_and_input):
    block, _ = block_and_input
    with pytest.warns(UserWarning, match="lm_head"):
        qjax.quantize(block, [qjax.Rule("lm_head", weight=qn.QuantSpec("int8")), W8A8], "qat")
    with pytest.raises(ValueError, match="matched no module"):
        qjax.quantize(block, qjax.Recipe((qjax.Rule("nothing.*", weight=qn.QuantSpec("int8")),), strict=True), "qat")
    with pytest.raises(ValueError, match="unknown rule op"):
        qjax.Rule(".*", op="matmul")
    with pytest.raises(ValueError, match="unknown mode"):
        qjax.quantize(block, [W8A8], "int8")
    with pytest.raises(ValueError, match="not a valid regex"):
        qjax.Rule("(")


def test_calibrate_then_static_ptq_uses_observed_ranges(block_and_input):
    block, x = block_and_input
    rule = qjax.Rule("up", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8"), static_act=True)
    cal = qjax.quantize(block, [rule], "calibrate")
    batches = [x, x * 2.0, x - 0.5]
    for b in batches:
        np.testing.assert_allclose(np.asarray(cal(b)), np.asarray(block(b)), rtol=1e-6, atol=1e-6)  # float forward
    # the input of `up` is h = x + o(attn(x)); observe it independently with a capture
    inputs = []
    original = block.up

    class Capture(nnx.Module):
        def __init__(self, lin):
            self.lin = lin

        def __call__(self, h):
            inputs.append(np.asarray(h))
            return self.lin(h)

    probe = nnx.clone(block)
    probe.up = Capture(nnx.clone(original))
    for b in batches:
        probe(b)
    amax = max(np.abs(h).max() for h in inputs)
    served = qjax.quantize(cal, [rule], "serve")
    np.testing.assert_allclose(float(served.up.act_scale.get_value()["scale"]), amax / 127, rtol=1e-5)
    with pytest.raises(ValueError, match="calibrat"):
        qjax.quantize(block, [rule], "ptq")  # static scales without calibration


def test_nan_in_calibration_data_is_a_clear_error(block_and_input):
    block, x = block_and_input
    rule = qjax.Rule("up", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8"), static_act=True)
    cal = qjax.quantize(block, [rule], "calibrate")
    cal(x.at[0, 3, 5].set(jnp.nan))
    with pytest.raises(ValueError, match="calibration statistics contain NaN"):
        qjax.quantize(cal, [rule], "ptq")


def test_mixed_formats_per_layer_first_match_wins(block_and_input):
    block, x = block_and_input
    recipe = [
        qjax.Rule("q|k", weight=qn.QuantSpec("int8", qn.per_axis(1))),
        qjax.Rule("v", weight=qn.QuantSpec("fp8_e4m3", qn.per_axis(1))),
        qjax.Rule("up|down", weight=qn.QuantSpec("nf4", qn.per_group(0, 64))),
        qjax.Rule(".*", weight=qn.QuantSpec("int2", qn.per_group(0, 32))),  # catch-all: only `o` is left for it
    ]
    ops = qjax.transforms.quantized_ops(qjax.quantize(block, recipe, "ptq"))
    formats = {p: op.kernel.get_value().format.name for p, op in ops.items()}
    assert formats == {"q": "int8", "k": "int8", "v": "fp8_e4m3", "up": "nf4", "down": "nf4", "o": "int2"}


def test_percentile_and_ema_observers():
    from qjax.transforms import calibration

    x1 = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)), jnp.float32)
    x2 = x1 * 3
    s = calibration.init_stats(())
    s = calibration.observe(calibration.observe(s, x1, "ema", ema_decay=0.1), x2, "ema", ema_decay=0.1)
    np.testing.assert_allclose(float(s["max"]), 0.9 * float(x1.max()) + 0.1 * float(x2.max()), rtol=1e-6)
    p = calibration.observe(calibration.init_stats((8,)), x1, "percentile", percentile=90.0)
    np.testing.assert_allclose(np.asarray(p["max"]), np.percentile(np.asarray(x1), 90, axis=0), rtol=1e-5)


def test_jit_grad_and_optax_training_in_qat(block_and_input):
    block, x = block_and_input
    qb = qjax.quantize(block, [W4A8], "qat")
    opt = nnx.Optimizer(qb, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - x) ** 2))(model)
        opt.update(model, g)
        return loss

    losses = [float(step(qb, opt, x)) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_nnx_scan_and_remat_over_stacked_layers():
    x = jax.random.normal(jax.random.key(2), (2, 8, 64))
    for remat in (False, True):
        stack = Stack(3, 64, 2, 128, nnx.Rngs(0), remat=remat)
        rule = qjax.Rule(weight=qn.QuantSpec("int4", qn.per_group(0, 32)), act=qn.QuantSpec("int8", qn.per_token()))
        yq = qjax.quantize(stack, [rule], "qat")(x)
        yp = qjax.quantize(stack, [rule], "ptq")(x)
        ys = nnx.jit(lambda m, x: m(x))(qjax.quantize(stack, [rule], "serve"), x)
        np.testing.assert_allclose(np.asarray(yp), np.asarray(yq), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(ys), np.asarray(yq), rtol=1e-4, atol=1e-4)
        # reference: apply each layer separately with its own slice of the stacked weights
        h = x
        graphdef, state = nnx.split(stack.layers)
        for i in range(3):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            h = qjax.quantize(layer, [rule], "qat")(h)
        np.testing.assert_allclose(np.asarray(yq), np.asarray(h), rtol=1e-5, atol=1e-5)
        g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qjax.quantize(stack, [rule], "qat"))
        assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(g))


def test_calibration_in_scanned_layers_keeps_per_layer_statistics():
    x = jax.random.normal(jax.random.key(3), (2, 8, 64))
    stack = Stack(3, 64, 2, 128, nnx.Rngs(0))
    rule = qjax.Rule("layers.up", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8"), static_act=True)
    cal = qjax.quantize(stack, [rule], "calibrate")
    cal(x)
    stats = cal.layers.up.act_stats.get_value()
    assert stats["max"].shape == (3,) and np.all(np.asarray(stats["count"]) == 1)
    assert len(set(np.asarray(stats["max"]).round(6).tolist())) == 3
    served = qjax.quantize(cal, [rule], "serve")
    assert served(x).shape == x.shape


def test_sharded_parameters_over_8_devices(block_and_input):
    block, x = block_and_input
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    sharded = nnx.clone(block)
    for name in ("q", "k", "v", "up"):
        lin = getattr(sharded, name)
        lin.kernel.set_value(jax.device_put(lin.kernel[...], NamedSharding(mesh, P(None, "model"))))
    for name in ("o", "down"):
        lin = getattr(sharded, name)
        lin.kernel.set_value(jax.device_put(lin.kernel[...], NamedSharding(mesh, P("model", None))))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    for mode in ("qat", "ptq", "serve"):
        expected = qjax.quantize(block, [W4A8], mode)(x)
        qs = qjax.quantize(sharded, [W4A8], mode)
        y = nnx.jit(lambda m, x: m(x))(qs, xs)
        np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_w4a4_qat_beats_ptq_of_a_float_trained_model():
    """Teacher-labelled 10-way classification: 200 steps of W4A4 QAT end at a much lower quantized
    cross-entropy than 200 steps of float training followed by PTQ (QAT learns quantization-robust margins)."""
    xs = jax.random.normal(jax.random.key(5), (1024, 32))
    labels = jnp.argmax(xs @ jax.random.normal(jax.random.key(6), (32, 10)), -1)
    rule = qjax.Rule(weight=qn.QuantSpec("int4", qn.per_axis(1)), act=qn.QuantSpec("int4", qn.per_token()))
    ce = lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(xs), labels))  # noqa: E731

    def train(model, steps=200):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt):
            loss, g = nnx.value_and_grad(ce)(model)
            opt.update(model, g)
            return loss

        for _ in range(steps):
            step(model, opt)
        return model

    student = lambda: nnx.Sequential(nnx.Linear(32, 64, rngs=nnx.Rngs(1)), jax.nn.relu, nnx.Linear(64, 10, rngs=nnx.Rngs(2)))  # noqa: E731
    ptq = qjax.quantize(train(student()), [rule], "ptq")
    qat = qjax.quantize(train(qjax.quantize(student(), [rule], "qat")), [rule], "ptq")
    assert float(ce(qat)) < 0.5 * float(ce(ptq)), (float(ce(qat)), float(ce(ptq)))


def test_lsq_weight_scales_train_and_carry_into_ptq():
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=rngs), jax.nn.relu, nnx.Linear(32, 8, rngs=rngs))
    x = jax.random.normal(jax.random.key(0), (64, 16))
    target = model(x)
    rule = qjax.Rule(weight=qn.QuantSpec("int3", qn.per_axis(1)), gradient="lsq")
    qat = qjax.quantize(model, [rule], "qat")
    s0 = np.asarray(qat.layers[0].weight_scale[...]).copy()
    opt = nnx.Optimizer(qat, optax.adam(1e-2), wrt=nnx.Param)
    for _ in range(20):
        g = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(qat)
        opt.update(qat, g)
    assert not np.allclose(np.asarray(qat.layers[0].weight_scale[...]), s0)
    ptq = qjax.quantize(qat, [rule], "ptq")
    np.testing.assert_allclose(np.asarray(ptq.layers[0].kernel.get_value().scale), np.asarray(qat.layers[0].weight_scale[...]))
    np.testing.assert_allclose(np.asarray(ptq(x)), np.asarray(qat(x)), rtol=1e-5, atol=1e-5)


def test_einsum_conv_embed_modules():
    rngs = nnx.Rngs(0)
    ein = nnx.Einsum("btd,dhk->bthk", (32, 4, 8), (4, 8), rngs=rngs)
    conv = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
    emb = nnx.Embed(50, 16, rngs=rngs)
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    img = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    ids = jnp.array([[1, 4, 49], [0, 7, 7]])
    w8 = qn.QuantSpec("int8", qn.per_axis(-1))
    a8 = qn.QuantSpec("int8", qn.per_axis(0))
    for mode in ("qat", "ptq", "serve"):
        qe = qjax.quantize(ein, [qjax.Rule(weight=qn.QuantSpec("int8", qn.per_axis(1, 2)), act=qn.QuantSpec("int8", qn.per_token()))], mode)
        wq = qn.quantize_dequantize(ein.kernel[...], qn.QuantSpec("int8", qn.per_axis(1, 2)))
        xq = qn.quantize_dequantize(x, qn.QuantSpec("int8", qn.per_token()))
        np.testing.assert_allclose(np.asarray(qe(x)), np.asarray(jnp.einsum("btd,dhk->bthk", xq, wq) + ein.bias[...]), rtol=1e-4, atol=1e-4)
        qc = qjax.quantize(conv, [qjax.Rule(weight=w8, act=a8)], mode)
        cref = jax.lax.conv_general_dilated(qn.quantize_dequantize(img, a8), qn.quantize_dequantize(conv.kernel[...], w8), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]  # fmt: skip
        np.testing.assert_allclose(np.asarray(qc(img)), np.asarray(cref), rtol=1e-4, atol=1e-4)
        qm = qjax.quantize(emb, [qjax.Rule(weight=qn.QuantSpec("int4", qn.per_axis(0)))], mode)
        table = qn.quantize_dequantize(emb.embedding[...], qn.QuantSpec("int4", qn.per_axis(0)))
        np.testing.assert_allclose(np.asarray(qm(ids)), np.asarray(table[ids]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(qm.attend(x[..., :16])), np.asarray(x[..., :16] @ table.T), rtol=1e-4, atol=1e-4)


def test_custom_module_with_dot_general_hook():
    class Custom(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (24, 6)))
            self.dot_general = jax.lax.dot_general
            self.in_features = 24

        def __call__(self, x):
            return self.dot_general(x, self.w[...], (((1,), (0,)), ((), ())))

    m = Custom(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 24))
    spec = qn.QuantSpec("int4", qn.per_group(0, 8))
    q = qjax.quantize(m, [qjax.Rule(weight=spec)], "qat")
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(x @ qn.quantize_dequantize(m.w[...], spec)), rtol=1e-5, atol=1e-5)
    s = qjax.quantize(m, [qjax.Rule(weight=spec, act=qn.QuantSpec("int8", qn.per_token()))], "serve")
    ref64 = np.asarray(qn.quantize_dequantize(x, qn.QuantSpec("int8", qn.per_token())), np.float64) @ np.asarray(qn.quantize_dequantize(m.w[...], spec), np.float64)
    np.testing.assert_allclose(np.asarray(s(x)), ref64, rtol=1e-5, atol=1e-5)


def test_backward_pass_quantization_quantizes_the_cotangent():
    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 8))
    spec = qn.QuantSpec("int4")
    q = qjax.quantize(lin, [qjax.Rule(backward=spec)], "qat")
    cot = jax.random.normal(jax.random.key(1), (5, 4))
    gx = jax.grad(lambda x: jnp.sum(q(x) * cot))(x)
    expected = qn.quantize_dequantize(cot, spec) @ lin.kernel[...].T
    np.testing.assert_allclose(np.asarray(gx), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_orbax_save_restore_is_bit_identical(tmp_path, block_and_input):
    block, x = block_and_input
    qb = qjax.quantize(block, [W4A8], "ptq")
    qjax.save_model(qb, tmp_path / "ckpt")
    template = qjax.quantize(Block(D, HEADS, HIDDEN, nnx.Rngs(42)), [W4A8], "ptq")
    restored = qjax.restore_model(template, tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(qb(x)))
    assert isinstance(restored.q.kernel.get_value(), qn.QArray)
    with pytest.raises(FileNotFoundError):
        qjax.restore_model(template, tmp_path / "missing")


def test_linen_dense_and_embed():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            e = nn.Embed(40, 32, name="embed")
            h = nn.Dense(64, name="up")(e(ids))
            return nn.Dense(32, name="down")(jax.nn.relu(h))

    net = Net()
    ids = jnp.array([[1, 2, 3], [4, 5, 39]])
    params = net.init(jax.random.key(0), ids)
    w = qn.QuantSpec("int4", qn.per_group(0, 16))
    a = qn.QuantSpec("int8", qn.per_token())
    recipe = [qjax.Rule(op="dot_general", weight=w, act=a)]
    qat = qjax.quantize(net, recipe, "qat")
    p = params["params"]
    e = p["embed"]["embedding"][ids]
    h = qn.quantize_dequantize(e, a) @ qn.quantize_dequantize(p["up"]["kernel"], w) + p["up"]["bias"]
    expected = qn.quantize_dequantize(jax.nn.relu(h), a) @ qn.quantize_dequantize(p["down"]["kernel"], w) + p["down"]["bias"]
    np.testing.assert_allclose(np.asarray(qat.apply(params, ids)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    serve = qjax.quantize(net, recipe, "serve")
    packed = serve.quantize_params(params, ids)
    assert isinstance(packed["params"]["up"]["kernel"], qn.QArray)
    np.testing.assert_allclose(np.asarray(serve.apply(packed, ids)), np.asarray(expected), rtol=1e-4, atol=1e-4)
    with pytest.raises(NotImplementedError, match="LSQ"):
        qjax.quantize(net, [qjax.Rule(weight=w, gradient="lsq")], "qat")

    # calibrate (statistics sown into "quant_stats") → static per-tensor activation scales
    static = [qjax.Rule("up", weight=qn.QuantSpec("int8", qn.per_axis(1)), act=qn.QuantSpec("int8"), static_act=True)]
    cal = qjax.quantize(net, static, "calibrate")
    stats = {}
    batches = [ids, (ids + 7) % 40]
    for b in batches:
        y, stats = cal.apply({**params, **stats}, b, mutable=["quant_stats"])
        np.testing.assert_allclose(np.asarray(y), np.asarray(net.apply(params, b)), rtol=1e-6)  # float forward
    amax = max(float(jnp.max(jnp.abs(p["embed"]["embedding"][b]))) for b in batches)
    ptq = qjax.quantize(net, static, "serve")
    packed = ptq.quantize_params({**params, **stats}, ids)
    np.testing.assert_allclose(float(packed["quant_scales"]["up"]["act_scale"]), amax / 127, rtol=1e-6)
    s = amax / 127
    e = p["embed"]["embedding"][ids]
    x_q = jnp.clip(jnp.round(e / s), -128, 127) * s
    w_q = qn.quantize_dequantize(p["up"]["kernel"], qn.QuantSpec("int8", qn.per_axis(1)))
    expected = jax.nn.relu(x_q @ w_q + p["up"]["bias"]) @ p["down"]["kernel"] + p["down"]["bias"]
    np.testing.assert_allclose(np.asarray(ptq.apply(packed, ids)), np.asarray(expected), rtol=1e-4, atol=1e-4)


class GatedProjection(nnx.Module):
    """A custom layer with raw einsum / dot_general calls on its own parameters (no hook, no Linear)."""

    def __init__(self, rngs):
        self.w_in = nnx.Param(jax.random.normal(rngs.params(), (24, 2, 16)) / 5)  # (d, heads, k)
        self.w_out = nnx.Param(jax.random.normal(rngs.params(), (32, 24)) / 5)  # (k*heads, d), used transposed
        self.gain = nnx.Param(jnp.ones((24,)))

    def __call__(self, x):
        h = jnp.einsum("btd,dhk->bthk", x * self.gain[...], self.w_in[...])
        h = jax.nn.relu(h).reshape(*x.shape[:2], 32)
        return jax.lax.dot_general(h, self.w_out[...].T.T, (((2,), (0,)), ((), ())))


def test_custom_module_matmuls_are_intercepted_without_patching():
    m = GatedProjection(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 24))
    wspec = qn.QuantSpec("int4", qn.per_axis(-1))  # in each parameter's own layout
    aspec = qn.QuantSpec("int8", qn.per_token())
    rule = qjax.Rule("proj", weight=wspec, act=aspec)

    def reference(fq_w):
        w_in, w_out = fq_w(m.w_in[...]), fq_w(m.w_out[...])
        h = jnp.einsum("btd,dhk->bthk", qn.quantize_dequantize(x * m.gain[...], aspec), w_in)
        h = jax.nn.relu(h).reshape(2, 5, 32)
        return qn.quantize_dequantize(h, aspec) @ w_out

    class Holder(nnx.Module):
        def __init__(self):
            self.proj = m

        def __call__(self, x):
            return self.proj(x)

    for mode in ("qat", "ptq", "serve"):
        q = qjax.quantize(Holder(), [rule], mode)
        assert isinstance(q.proj, qjax.transforms.QIntercepted)
        expected = reference(lambda w: qn.quantize_dequantize(w, wspec))
        np.testing.assert_allclose(np.asarray(q(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
        if mode != "qat":
            assert isinstance(q.proj.inner.w_in.get_value(), qn.QArray) and not isinstance(q.proj.inner.gain.get_value(), qn.QArray)
    # gradients flow (STE) through the intercepted module in QAT
    q = qjax.quantize(Holder(), [rule], "qat")
    g = nnx.grad(lambda mod: jnp.sum(mod(x) ** 2))(q)
    assert np.abs(np.asarray(g["proj"]["inner"]["w_in"][...])).sum() > 0
    assert qjax.param_bytes(qjax.quantize(Holder(), [rule], "ptq")) < 0.3 * qjax.param_bytes(Holder())
    # qat → ptq converts the existing wrapper instead of wrapping its inner module again
    p2 = qjax.quantize(qjax.quantize(Holder(), [rule], "qat"), [rule], "ptq")
    assert isinstance(p2.proj, qjax.transforms.QIntercepted) and not isinstance(p2.proj.inner, qjax.transforms.QIntercepted)
    assert isinstance(p2.proj.inner.w_in.get_value(), qn.QArray)
    np.testing.assert_allclose(np.asarray(p2(x)), np.asarray(qjax.quantize(Holder(), [rule], "ptq")(x)), rtol=1e-6)


def test_linen_conv_dense_general_einsum_weights_and_inputs():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, img):
            h = nn.Conv(8, (3, 3), padding="SAME", name="conv")(img)  # kernel (3, 3, 4, 8)
            h = nn.DenseGeneral((2, 4), name="dg")(jax.nn.relu(h))  # kernel (8, 2, 4)
            return h.sum(axis=(-1, -2))

    net = Net()
    img = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    params = net.init(jax.random.key(1), img)
    w = qn.QuantSpec("int4", qn.per_axis(-1))
    a = qn.QuantSpec("int8", qn.per_tensor())
    recipe = [qjax.Rule(weight=w, act=a)]
    p = params["params"]
    h = jax.lax.conv_general_dilated(qn.quantize_dequantize(img, a), qn.quantize_dequantize(p["conv"]["kernel"], w), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]  # fmt: skip
    h = jnp.einsum("bxyc,cij->bxyij", qn.quantize_dequantize(jax.nn.relu(h), a), qn.quantize_dequantize(p["dg"]["kernel"], w)) + p["dg"]["bias"]
    expected = h.sum(axis=(-1, -2))
    qat = qjax.quantize(net, recipe, "qat")
    np.testing.assert_allclose(np.asarray(qat.apply(params, img)), np.asarray(expected), rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda prm: jnp.sum(qat.apply(prm, img) ** 2))(params)  # STE through the tree quantization
    assert float(jnp.abs(g["params"]["conv"]["kernel"]).sum()) > 0
    ptq = qjax.quantize(net, recipe, "ptq")
    packed = ptq.quantize_params(params, img)
    assert isinstance(packed["params"]["conv"]["kernel"], qn.QArray) and isinstance(packed["params"]["dg"]["kernel"], qn.QArray)
    np.testing.assert_allclose(np.asarray(ptq.apply(packed, img)), np.asarray(expected), rtol=1e-4, atol=1e-4)
