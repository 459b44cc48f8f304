"""A DiT block against a NumPy reference written from the formulas: adaLN-Zero modulation,
grouped-KV self-attention with qk RMS-norm, cross-attention to padded text, the GELU FFN."""

import jax
import numpy as np
from flax import nnx

from ecdit_jax.model.dit import DiTBlock
from ecdit_jax.model.params import to_pure_dict
from tests.tiny import perturbed, tiny_model_config

EPS = 1e-6


def layer_norm(x, scale=None, bias=None):
  mean = x.mean(-1, keepdims=True)
  out = (x - mean) / np.sqrt(x.var(-1, keepdims=True) + EPS)
  return out if scale is None else out * scale + bias


def rms_norm(x, scale):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * scale


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def attention(p, x, context, lengths, num_heads, num_kv_heads):
  """Multi-head attention, query head h reading key/value head h // (heads / kv_heads), keys
  past ``lengths`` masked."""
  project = lambda w, v: np.einsum("bsd,dhk->bshk", v, w["kernel"]) + w["bias"]
  q, k, v = project(p["query"], x), project(p["key"], context), project(p["value"], context)
  if "query_norm" in p:
    q, k = rms_norm(q, p["query_norm"]["scale"]), rms_norm(k, p["key_norm"]["scale"])
  group = num_heads // num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  if lengths is not None:
    valid = np.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = np.where(valid[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def reference_block(p, x, c, context, lengths, config):
  silu = c / (1 + np.exp(-c))
  mods = np.split(silu @ p["modulation"]["proj"]["kernel"] + p["modulation"]["proj"]["bias"], 6,
                  axis=-1)
  shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, None] for m in mods)
  heads = (config.num_heads, config.kv_heads)
  h = layer_norm(x) * (1 + scale_sa) + shift_sa
  x = x + gate_sa * attention(p["self_attn"], h, h, None, *heads)
  cross_in = layer_norm(x, p["norm_cross"]["scale"], p["norm_cross"]["bias"])
  x = x + attention(p["cross_attn"], cross_in, context, lengths, *heads)
  h = layer_norm(x) * (1 + scale_ff) + shift_ff
  ffn = p["ffn"]
  y = gelu_tanh(h @ ffn["fc1"]["kernel"] + ffn["fc1"]["bias"]) @ ffn["fc2"]["kernel"]
  return x + gate_ff * (y + ffn["fc2"]["bias"])


def test_dense_block_matches_numpy():
  config = tiny_model_config(num_heads=4, num_kv_heads=2, qk_norm=True)
  block = DiTBlock(config, 0, rngs=nnx.Rngs(0))  # block 0: dense FFN
  graphdef, params = nnx.split(block)
  params = perturbed(to_pure_dict(params), scale=0.2)  # the zero-initialised branches live
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, config.hidden_size)).astype(np.float32)
  c = rng.standard_normal((2, config.hidden_size)).astype(np.float32)
  context = rng.standard_normal((2, 8, config.text_hidden_size)).astype(np.float32)
  lengths = np.array([3, 8], np.int32)

  @jax.jit
  def forward(params):
    out, aux = nnx.merge(graphdef, params)(x, c, context, lengths, train=True,
                                          capacity_factor=None)
    return out

  as_numpy = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = reference_block(as_numpy, x.astype(np.float64), c.astype(np.float64),
                         context.astype(np.float64), lengths, config)
  got = np.asarray(forward(params))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  # Padding is masked: text past a row's length cannot change that row.
  changed = context.copy()
  changed[0, 3:] = 100.0
  moved = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(
      x, c, changed, lengths, train=True, capacity_factor=None)[0])(params))
  np.testing.assert_allclose(moved[0], got[0], rtol=1e-5, atol=1e-5)
