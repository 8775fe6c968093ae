"""Facts read from compiled HLO text: collectives and array shapes.

`collectives(hlo)` lists every collective a compiled program executes per
call, with its execution count (static occurrences times the known trip
counts of the while loops around them) and its bytes per device:

  all-gather          the gathered (output) buffer;
  reduce-scatter      the full input buffer (output x group size);
  all-reduce          the reduced buffer (all operands of a combined one);
  collective-permute  the buffer sent;
  all-to-all          the buffer exchanged.

That is the logical size of the collective. What a device puts on the wire
with ring algorithms is (g - 1) / g of it for all-gather / reduce-scatter /
all-to-all, 2 (g - 1) / g for all-reduce and all of it for a permute, g the
group size (`wire_bytes`).
"""

from __future__ import annotations

import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute",
         "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
               "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) +
    r")(-start)?\(")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|"
                    r"true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def array_shapes(hlo: str) -> set[tuple[str, tuple[int, ...]]]:
  """Every (dtype, shape) that appears in the HLO text."""
  return {(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _ARRAY.findall(hlo)}


def _bytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    size = DTYPE_BYTES[dtype]
    for d in dims.split(","):
      if d:
        size *= int(d)
    total += size
  return total


def _group_size(line: str, default: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if groups:
    return len(groups.group(1).split(","))
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
  if pairs:
    return len(re.findall(r"\{", pairs.group(1))) + 1
  return default


def _computations(hlo: str):
  """{name: [lines]} and the entry computation's name."""
  bodies, entry, current = {}, None, None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(2)
      bodies[current] = []
      if match.group(1):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _executions(bodies, entry) -> dict[str, int]:
  """How many times each computation runs per call of the entry."""
  counts: dict[str, int] = {}

  def visit(name, times):
    counts[name] = counts.get(name, 0) + times
    for line in bodies.get(name, ()):
      trips = _TRIP_COUNT.search(line)
      for role, callee in _CALLS.findall(line):
        if callee in bodies and role in ("body", "condition"):
          visit(callee, times * (int(trips.group(1)) if trips else 1))
        elif callee in bodies and role != "to_apply":
          visit(callee, times)
      branches = _BRANCHES.search(line)
      for callee in (branches.group(1).split(",") if branches else ()):
        callee = callee.strip().lstrip("%")
        if callee in bodies:
          visit(callee, times)  # An upper bound: every branch counted.

  visit(entry, 1)
  return counts


def collectives(hlo: str, device_count: int) -> list[dict]:
  """One row per collective kind: count, bytes and wire bytes per device."""
  bodies, entry = _computations(hlo)
  executions = _executions(bodies, entry)
  rows: dict[str, dict] = {}
  for name, lines in bodies.items():
    times = executions.get(name, 0)
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match or not times:
        continue
      result_type, kind, is_start = match.groups()
      size = _bytes(result_type)
      if is_start:  # An (operand, output) tuple: count the output.
        size = _bytes(" ".join(_ARRAY.findall(result_type)[-1]).replace(
            " ", "[") + "]")
      group = _group_size(line, device_count)
      if kind == "reduce-scatter":
        size *= group
      wire = {"all-reduce": 2 * (group - 1) / group,
              "collective-permute": 1.0}.get(kind, (group - 1) / group)
      row = rows.setdefault(kind, {"kind": kind, "count": 0, "bytes": 0,
                                   "wire_bytes": 0, "shapes": set()})
      row["count"] += times
      row["bytes"] += times * size
      row["wire_bytes"] += int(times * size * wire)
      row["shapes"].update(f"{d}[{s}]" for d, s in _ARRAY.findall(result_type))
  return [{**row, "shapes": sorted(row["shapes"])}
          for kind in KINDS if (row := rows.get(kind))]


_FUSION_CALL = re.compile(r"calls=%?([\w.\-]+)")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_HEAVY_OPS = ("dot", "convolution", "transpose", "reduce", "gather",
              "scatter")


def thunk_categories(hlo: str) -> dict[str, str]:
  """{instruction name: category} for the entry's fusions and ops.

  A fusion's category is the heaviest op inside it (_HEAVY_OPS order),
  else 'elementwise'.
  """
  bodies, entry = _computations(hlo)
  categories = {}
  for line in bodies.get(entry, ()):
    match = _OP.match(line)
    if not match:
      continue
    name, _, op = match.groups()
    ops = {op}
    call = _FUSION_CALL.search(line)
    if op == "fusion" and call:
      ops = {m.group(3) for m in map(_OP.match, bodies.get(call.group(1), ()))
             if m}
    categories[name] = next((h for h in _HEAVY_OPS if h in ops),
                            "elementwise")
  return categories
