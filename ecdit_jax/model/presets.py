"""Named model sizes: the paper's XL, XXL, 3XL and M backbones plus S and B, with E experts.

A preset name is ``SIZE-<E>E`` (expert-choice MoE every other block) or ``SIZE-dense``, e.g.
``XL-32E``, ``M-64E``, ``B-dense``. The paper shortens M to 38 layers when it has 64 experts.
"""

from __future__ import annotations

import re
from typing import Any

# size: (hidden_size, num_layers, num_heads)
BACKBONES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "XL": (1152, 28, 18),
    "XXL": (1536, 38, 24),
    "3XL": (2304, 42, 36),
    "M": (3072, 46, 48),
}
EXPERT_COUNTS = (8, 16, 32, 64)
M_LAYERS_WITH_64_EXPERTS = 38

_NAME = re.compile(r"^(?P<size>[A-Za-z0-9]+?)-(?:(?P<experts>\d+)E|(?P<dense>dense))$")


def preset_names() -> list[str]:
  names = []
  for size in BACKBONES:
    names.append(f"{size}-dense")
    names.extend(f"{size}-{e}E" for e in EXPERT_COUNTS)
  return names


def model_overrides(name: str) -> dict[str, Any]:
  """The ``config.model`` keys that a preset sets; raises naming the valid choices."""
  match = _NAME.match(name)
  if not match or match["size"] not in BACKBONES:
    raise ValueError(f"unknown model preset {name!r}; choose SIZE-<E>E or SIZE-dense with SIZE "
                     f"in {sorted(BACKBONES)} and E in {EXPERT_COUNTS}, e.g. 'XL-32E'")
  hidden, layers, heads = BACKBONES[match["size"]]
  if match["dense"]:
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, moe_layout="none")
  experts = int(match["experts"])
  if experts not in EXPERT_COUNTS:
    raise ValueError(f"preset {name!r}: expert count must be one of {EXPERT_COUNTS}")
  if match["size"] == "M" and experts == 64:
    layers = M_LAYERS_WITH_64_EXPERTS
  return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, moe_layout="every_other",
              router="expert_choice", num_experts=experts)
