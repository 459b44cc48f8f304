r"""Which line of our source each instruction of a compiled XLA module came from.

  python bench/step.py --model=ec --profile_dir=bench/out/prof --hlo_out=bench/out/ec.hlo.gz
  python bench/trace_summary.py bench/out/prof --steps=10 --hlo=bench/out/ec.hlo.gz

A profile names kernels, and XLA reuses one kernel for every fusion of the same shape and body
(the optimizer update of all 14 expert layers runs as one kernel name), so kernel names alone
say little about where the time goes. The profile's events also carry the HLO instruction
(``hlo_op``); the optimized module's text (``compiled.as_text()``) gives each instruction its
metadata: the JAX op name (``jit(train_step)/.../transpose(jvp(...))/dot_general``) and a stack
frame id, which indexes the module's FileNames / FunctionNames / FileLocations / StackFrames
tables. This module reads those tables and names, for an instruction, the innermost frame in
the project (``ecdit_jax/model/moe.py:161 ExpertChoiceMoE.__call__``) and whether it is part of
the forward pass, the backward pass, or neither (the optimizer, the EMA, the input).
"""

from __future__ import annotations

import dataclasses
import gzip
import re

# Where a frame is ours: the first of these path parts that appears in the file name.
PROJECT_DIRS = ("ecdit_jax/", "bench/", "configs/")

_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_LOCATION = re.compile(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
_STACK_FRAME = re.compile(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)")


@dataclasses.dataclass
class HloSources:
  files: dict[int, str]
  functions: dict[int, str]
  locations: dict[int, tuple[int, int, int]]  # id -> (file id, function id, line)
  frames: dict[int, tuple[int, int]]  # id -> (location id, parent frame id; 0 = none)
  instructions: dict[str, tuple[str, int]]  # name -> (op_name, stack frame id; 0 = none)

  def stack(self, frame_id: int) -> list[tuple[str, int, str]]:
    """(file, line, function) from the innermost frame outwards."""
    out, seen = [], set()
    while frame_id in self.frames and frame_id not in seen:
      seen.add(frame_id)
      location, frame_id = self.frames[frame_id]
      file_id, function_id, line = self.locations[location]
      out.append((self.files[file_id], line, self.functions[function_id]))
    return out

  def source(self, instruction: str) -> str:
    """'path:line function' of the innermost project frame, else of the innermost frame."""
    _, frame_id = self.instructions.get(instruction, ("", 0))
    frames = self.stack(frame_id)
    if not frames:
      return "(no source)"
    for file, line, function in frames:
      for part in PROJECT_DIRS:
        if part in file:
          return f"{part}{file.split(part, 1)[1]}:{line} {function}"
    file, line, function = frames[0]
    return f"{file.rsplit('/', 1)[-1]}:{line} {function}"

  def phase(self, instruction: str) -> str:
    """'bwd' for the transpose (backward) of differentiated code, 'fwd' for the rest of it,
    '-' for what was not differentiated (the optimizer, EMA, noise)."""
    op_name, _ = self.instructions.get(instruction, ("", 0))
    if "transpose(" in op_name:
      return "bwd"
    if "jvp(" in op_name:
      return "fwd"
    return "-"


def parse(text: str) -> HloSources:
  """Reads the stack-frame tables and every instruction's metadata of an HLO module's text."""
  tables: dict[str, list[str]] = {name: [] for name in _TABLES}
  instructions: dict[str, tuple[str, int]] = {}
  current = None
  for line in text.splitlines():
    if line in _TABLES:
      current = line
      continue
    if current is not None:
      if line.strip():
        tables[current].append(line)
        continue
      current = None
    match = _INSTRUCTION.match(line)
    if match:
      op_name = _OP_NAME.search(match.group(2))
      frame = _FRAME.search(match.group(2))
      instructions[match.group(1)] = (op_name.group(1) if op_name else "",
                                      int(frame.group(1)) if frame else 0)

  def names(rows):
    return {int(i): name.strip().strip('"') for i, name in (r.split(" ", 1) for r in rows)}

  locations = {}
  for row in tables["FileLocations"]:
    m = _LOCATION.match(row)
    if m:
      locations[int(m[1])] = (int(m[2]), int(m[3]), int(m[4]))
  frames = {}
  for row in tables["StackFrames"]:
    m = _STACK_FRAME.match(row)
    if m:
      # The text prints a frame's parent one above its id: "parent_frame_id=1" is the root.
      frames[int(m[1])] = (int(m[2]), int(m[3]) - 1)
  return HloSources(names(tables["FileNames"]), names(tables["FunctionNames"]), locations, frames,
                    instructions)


def load(path: str) -> HloSources:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return parse(f.read())
