"""Quantized ops: integer path = float64 reference of the dequantized operands; fake path; transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qjax.numerics as qn
import qjax.ops as qo

DN = (((1,), (0,)), ((), ()))


def _ref(a: qn.QArray, b: qn.QArray, subscripts: str) -> np.ndarray:
    return np.einsum(subscripts, np.asarray(a.dequantize(), np.float64), np.asarray(b.dequantize(), np.float64))


def _close(y, ref, rel=3e-6):
    scale = np.abs(ref).max() + 1e-30
    assert np.abs(np.asarray(y, np.float64) - ref).max() <= rel * scale * np.sqrt(ref.size) + 1e-6


lhs_kinds = st.sampled_from(["tensor", "token", "group", "block"])
rhs_kinds = st.sampled_from(["tensor", "channel", "group", "block"])


def _lhs_gran(kind, g):
    return {"tensor": qn.per_tensor(), "token": qn.per_axis(0), "group": qn.per_group(1, g), "block": qn.per_block((4, g))}[kind]


def _rhs_gran(kind, g):
    return {"tensor": qn.per_tensor(), "channel": qn.per_axis(1), "group": qn.per_group(0, g), "block": qn.per_block((g, 8))}[kind]


@given(
    m=st.integers(1, 9), k=st.integers(1, 90), n=st.integers(1, 20),
    lk=lhs_kinds, rk=rhs_kinds, lg=st.integers(1, 40), rg=st.integers(1, 40),
    lfmt=st.sampled_from(["int8", "int4", "uint8", "int3"]), rfmt=st.sampled_from(["int8", "int4", "uint4", "int2"]),
    lsym=st.booleans(), rsym=st.booleans(), seed=st.integers(0, 9999),
)  # fmt: skip
def test_integer_dot_equals_float64_reference_of_dequantized_operands(m, k, n, lk, rk, lg, rg, lfmt, rfmt, lsym, rsym, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if lfmt.startswith("u") and lsym:
        x = np.abs(x)
    if rfmt.startswith("u") and rsym:
        w = np.abs(w)
    a = qn.quantize(jnp.asarray(x), qn.QuantSpec(lfmt, _lhs_gran(lk, lg), symmetric=lsym))
    b = qn.quantize(jnp.asarray(w), qn.QuantSpec(rfmt, _rhs_gran(rk, rg), symmetric=rsym))
    y = qo.dot_general(a, b, DN, mode="int")
    assert y.shape == (m, n) and y.dtype == jnp.float32
    _close(y, _ref(a, b, "mk,kn->mn"))


def test_integer_path_uses_an_int32_accumulating_dot():
    a = qn.quantize(jnp.ones((4, 64)), qn.QuantSpec("int8", qn.per_axis(0)))
    b = qn.quantize(jnp.ones((64, 8)), qn.QuantSpec("int4", qn.per_group(0, 32)))
    hlo = jax.jit(lambda a, b: qo.dot_general(a, b, DN, mode="int")).lower(a, b).as_text()
    assert "xi8>" in hlo and "-> tensor<1x2x4x8xi32>" in hlo.replace("\n", " ") or "xi32" in hlo


def test_fake_and_integer_paths_agree():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)
    ls, rs = qn.QuantSpec("int8", qn.per_token()), qn.QuantSpec("int4", qn.per_group(0, 32))
    dn = (((2,), (0,)), ((), ()))
    yf = qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="fake")
    yi = qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int")
    np.testing.assert_allclose(np.asarray(yi), np.asarray(yf), rtol=1e-5, atol=1e-4)


def test_batched_dot_general_and_einsum_match_references():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 3, 10, 16)), jnp.float32)  # (b, h, t, d)
    kk = jnp.asarray(rng.standard_normal((2, 3, 12, 16)), jnp.float32)
    spec = qn.QuantSpec("int8", qn.per_token())
    y = qo.einsum("bhtd,bhsd->bhts", q, kk, lhs_spec=spec, rhs_spec=spec, mode="int")
    qa, qb = qn.quantize(q, spec), qn.quantize(kk, spec)
    _close(y, _ref(qa, qb, "bhtd,bhsd->bhts"))
    y2 = qo.einsum("...d,nd->...n", q, kk[0, 0], lhs_spec=spec, rhs_spec=qn.QuantSpec("int8", qn.per_axis(0)), mode="int")
    assert y2.shape == (2, 3, 10, 12)
    # no specs: exactly jnp.einsum
    np.testing.assert_allclose(np.asarray(qo.einsum("bhtd,bhsd->bhst", q, kk)), np.asarray(jnp.einsum("bhtd,bhsd->bhst", q, kk)), rtol=1e-6)


def test_weight_only_int_path_dequantizes_the_weight():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    wq = qn.quantize(jnp.asarray(rng.standard_normal((64, 9)), jnp.float32), qn.QuantSpec("int4", qn.per_group(0, 16)))
    y = qo.dot_general(x, wq, DN, mode="int")
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ np.asarray(wq.dequantize(), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dn,kernel_shape,rhs_axis", [(("NHWC", "HWIO", "NHWC"), (3, 3, 4, 6), 3), (("NCHW", "OIHW", "NCHW"), (6, 4, 3, 3), 0)])
def test_integer_conv_matches_reference(dn, kernel_shape, rhs_axis):
    rng = np.random.default_rng(3)
    img_shape = (2, 9, 11, 4) if dn[0] == "NHWC" else (2, 4, 9, 11)
    img = jnp.asarray(rng.standard_normal(img_shape), jnp.float32)
    ker = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
    ls, rs = qn.QuantSpec("int8", qn.per_axis(0)), qn.QuantSpec("int8", qn.per_axis(rhs_axis))
    y = qo.conv_general_dilated(img, ker, (2, 1), "SAME", dimension_numbers=dn, lhs_spec=ls, rhs_spec=rs, mode="int")
    yf = qo.conv_general_dilated(img, ker, (2, 1), "SAME", dimension_numbers=dn, lhs_spec=ls, rhs_spec=rs, mode="fake")
    a, b = qn.quantize(img, ls).dequantize(), qn.quantize(ker, rs).dequantize()
    ref = jax.lax.conv_general_dilated(a.astype(jnp.float64) if jax.config.x64_enabled else a, b, (2, 1), "SAME",
                                       dimension_numbers=dn, precision="highest")  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(yf), np.asarray(ref), rtol=1e-5, atol=1e-4)
    with pytest.raises(NotImplementedError, match="contraction"):
        qo.conv_general_dilated(img, ker, (1, 1), "SAME", dimension_numbers=dn, lhs_spec=qn.QuantSpec("int8", qn.per_token()),
                                rhs_spec=rs, mode="int")  # fmt: skip


def test_fake_quant_ops_are_differentiable_with_ste():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    rs = qn.QuantSpec("int4", qn.per_group(0, 8))
    f = lambda w: jnp.sum(qo.dot_general(x, w, DN, rhs_spec=rs) ** 2)  # noqa: E731
    g = jax.grad(f)(w)
    wq = qn.quantize_dequantize(w, rs)
    expected = 2 * x.T @ (x @ wq)  # STE: gradient of the quantized forward w.r.t. the dequantized weight
    np.testing.assert_allclose(np.asarray(g), np.asarray(expected), rtol=1e-5, atol=1e-4)


def test_ops_under_jit_vmap_and_sharding():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((8, 16, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    ls, rs = qn.QuantSpec("int8", qn.per_token()), qn.QuantSpec("int8", qn.per_axis(1))
    dn = (((2,), (0,)), ((), ()))
    eager = qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int")
    f = jax.jit(lambda x, w: qo.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs, mode="int"))
    np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(eager), rtol=1e-6, atol=1e-6)
    vm = jax.vmap(lambda xi: qo.dot_general(xi, w, DN, lhs_spec=ls, rhs_spec=rs, mode="int"))(x)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(eager), rtol=1e-6, atol=1e-6)
    devices = jax.devices()
    assert len(devices) >= 8, "conftest sets 8 host devices"
    mesh = Mesh(np.array(devices[:8]).reshape(4, 2), ("data", "model"))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    ys = f(xs, ws)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_op_errors_are_clear():
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="mode"):
        qo.dot_general(x, x.T, DN, mode="int4")
    with pytest.raises(ValueError, match="explicit output"):
        qo.einsum("ab,bc", x, x.T)
    with pytest.raises(ValueError, match="rank"):
        qo.einsum("abc,cd->abd", x, x.T)
    a = qn.quantize(x, qn.QuantSpec("int8"))
    with pytest.raises(ValueError, match="already a QArray"):
        qo.dot_general(a, x.T, DN, lhs_spec=qn.QuantSpec("int8"))
