"""Parameter counts: total, and activated per image token, from the model's abstract state.

Nothing is allocated: the model is built under ``nnx.eval_shape``. "Activated" counts each
parameter as often as an average image token uses it: an expert's weights are used by a token
only when that expert takes it, which happens f / E of the time under expert choice (f = the
capacity factor: each expert takes N f / E of N tokens) and k / E under token-choice top-k.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.dit import TextToImageDiT
from ecdit_jax.model.keys import ParamKeys


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int  # every parameter, text encoder included
  text_encoder: int
  backbone: int  # the DiT alone
  experts: int  # expert weights inside the backbone
  activated_per_token: float  # backbone parameters an average image token uses

  def summary(self) -> str:
    def b(n):
      return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return (f"total {b(self.total)} (backbone {b(self.backbone)}, experts {b(self.experts)}, "
            f"text encoder {b(self.text_encoder)}), activated per token "
            f"{b(self.activated_per_token)}")


def abstract_model(config: ModelConfig) -> TextToImageDiT:
  """The model with ShapeDtypeStructs in place of arrays: free to build at any size."""
  return nnx.eval_shape(lambda: TextToImageDiT(config, rngs=ParamKeys(0)))


def _size(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def experts_per_token(config: ModelConfig) -> float:
  """Average number of experts that process a token in an MoE layer."""
  if config.router == "expert_choice":
    return config.capacity_factor
  return float(config.token_choice_top_k)


def count_params(config: ModelConfig, model: TextToImageDiT | None = None) -> ParamCounts:
  """Counts ``model`` (built abstractly from ``config`` when not given)."""
  model = abstract_model(config) if model is None else model
  text = _size(nnx.state(model.text_encoder, nnx.Param))
  backbone = _size(nnx.state(model.dit, nnx.Param))
  experts = sum(_size(nnx.state(block.ffn.experts, nnx.Param))
                for block in model.dit.blocks if block.is_moe)
  share = experts_per_token(config) / config.num_experts if experts else 0.0
  return ParamCounts(total=text + backbone, text_encoder=text, backbone=backbone,
                     experts=experts, activated_per_token=backbone - experts + experts * share)
