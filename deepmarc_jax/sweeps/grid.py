"""Grid sweeps over config fields: cells, their workdirs, commands and records.

A sweep config is an ordinary experiment file (`get_config(arg)`, loaded by `run.py`) that also
defines `get_sweep(arg) -> {dotted config field: [values]}`. The grid is the Cartesian product of
the axes in declaration order (first axis slowest). Each cell is one `run.py` run:

  <python> run.py --config=FILE[:arg] --workdir=SWEEP_DIR/<cell> --config.<field>=<value> ...

Conventions:
  * A cell's name is `short=value` joined by '__' over the axes, `short` being the last dotted
    component of the field; axes whose short names clash are named by their full field instead.
    Values are written with str() and must not contain '/', ',' or whitespace.
  * An axis whose last component is 'seed' is a replicate axis (the report averages over it).
  * Optionally, `get_contrasts(arg) -> {field: baseline value}` names comparisons the report makes
    as paired differences: each other value of that (non-seed) axis minus the baseline, cell by
    cell with every other axis (the seed included) equal.
  * A cell is finished when its workdir holds `eval_<train.total_steps>.json`, with
    total_steps read from the cell's resolved config (get_config(arg) plus the cell's values).
    Unfinished cells are simply run again; run.py resumes from the cell's checkpoints.
  * SWEEP_DIR/sweep.json records the loaded sweep (`write_sweep_json`), and each cell's
    sweep_cell.json its runs (`record_cell`).

deepmarc_jax/sweeps/runner.py runs the cells. No JAX or TensorFlow here: listing, printing and
reporting a sweep stay fast.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SEED = 'seed'
CELL_FILE = 'sweep_cell.json'
SWEEP_FILE = 'sweep.json'
LOG_FILE = 'log.txt'
_BAD_VALUE_CHARS = re.compile(r'[/,\s]')


@dataclasses.dataclass(frozen=True)
class Cell:
  """One point of the grid.

  Attributes:
    name: the workdir name under the sweep dir, e.g. 'type=resnet4__train_crops=gt__seed=0'.
    overrides: ordered {dotted field: value}, one entry per axis.
    total_steps: train.total_steps of the cell's resolved config (its final eval's step).
  """
  name: str
  overrides: dict[str, Any]
  total_steps: int

  def workdir(self, sweep_dir: str) -> str:
    """Returns the cell's run.py workdir."""
    return os.path.join(sweep_dir, self.name)

  def eval_path(self, sweep_dir: str) -> str:
    """Returns the path of the cell's final evaluation, `eval_<total_steps>.json`."""
    return os.path.join(self.workdir(sweep_dir), f'eval_{self.total_steps}.json')

  def finished(self, sweep_dir: str) -> bool:
    """Returns whether the cell's final evaluation exists."""
    return os.path.isfile(self.eval_path(sweep_dir))


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded sweep.

  Attributes:
    config_path: absolute path of the sweep's experiment file.
    config_arg: the text after ':' in --config (None without one).
    sweep_dir: absolute path of the folder holding one workdir per cell.
    full_grid: the grid as get_sweep declares it.
    grid: the grid after --only narrowing.
    cells: the cells of `grid`, in grid order.
    all_cells: the cells of `full_grid`, in grid order (what the report covers).
    contrasts: {non-seed field: baseline value} from get_contrasts ({} without one).
  """
  config_path: str
  config_arg: str | None
  sweep_dir: str
  full_grid: dict[str, list[Any]]
  grid: dict[str, list[Any]]
  cells: list[Cell]
  all_cells: list[Cell]
  contrasts: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def config_flag(self) -> str:
    """Returns the --config value for run.py: 'PATH' or 'PATH:ARG'."""
    return self.config_path if self.config_arg is None else f'{self.config_path}:{self.config_arg}'


def short_name(field: str) -> str:
  """Returns the last dotted component of a config field."""
  return field.rsplit('.', 1)[-1]


def is_seed_axis(field: str) -> bool:
  """Returns whether an axis is a replicate (seed) axis."""
  return short_name(field) == SEED


def axis_labels(fields: Sequence[str]) -> dict[str, str]:
  """Returns {field: label used in cell names}: the short name unless another axis shares it."""
  shorts = [short_name(f) for f in fields]
  return {f: (s if shorts.count(s) == 1 else f) for f, s in zip(fields, shorts)}


def format_value(field: str, value: Any) -> str:
  """Returns str(value), as it appears in cell names and --config.<field>=<value> overrides.

  Raises:
    ValueError: the text is empty or contains '/', ',' or whitespace (it has to be a single
      folder-name component, a single shell word and a single --only list item).
  """
  text = str(value)
  if not text or _BAD_VALUE_CHARS.search(text):
    raise ValueError(f'sweep axis {field!r}: value {value!r} (str {text!r}) is not allowed; '
                     "values must be non-empty and contain no '/', ',' or whitespace")
  return text


def validate_grid(grid: Any) -> dict[str, list[Any]]:
  """Returns the grid as an ordered {field: list of values} after checking it.

  Raises:
    ValueError: not a non-empty mapping of field -> non-empty list, a value is not allowed by
      `format_value`, or two values of one axis have the same str().
  """
  if not isinstance(grid, Mapping) or not grid:
    raise ValueError(f'get_sweep must return a non-empty dict {{field: [values]}}, got {grid!r}')
  checked = {}
  for field, values in grid.items():
    if not isinstance(field, str) or not field or field.startswith('.') or field.endswith('.'):
      raise ValueError(f'sweep axis {field!r}: expected a dotted config field such as '
                       "'model.mask_head.type'")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise ValueError(f'sweep axis {field!r}: expected a non-empty list of values, got '
                       f'{values!r}')
    texts = [format_value(field, v) for v in values]
    duplicates = sorted({t for t in texts if texts.count(t) > 1})
    if duplicates:
      raise ValueError(f'sweep axis {field!r}: values {duplicates} appear more than once (as '
                       f'str); values: {list(values)}')
    checked[field] = list(values)
  return checked


def validate_contrasts(contrasts: Any, grid: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
  """Returns get_contrasts' {field: baseline}, the baseline as the grid holds it.

  Raises:
    ValueError: not a mapping, a field that is not a non-seed axis with >= 2 values, or a
      baseline (compared as str) that is not among the axis' values.
  """
  if not isinstance(contrasts, Mapping):
    raise ValueError(f'get_contrasts must return a dict {{field: baseline value}}, got '
                     f'{contrasts!r}')
  checked = {}
  for field, baseline in contrasts.items():
    if field not in grid or is_seed_axis(field) or len(grid[field]) < 2:
      axes = [f for f in grid if not is_seed_axis(f) and len(grid[f]) >= 2]
      raise ValueError(f'get_contrasts: {field!r} is not a non-seed sweep axis with two or more '
                       f'values; allowed: {axes}')
    matches = [v for v in grid[field] if str(v) == str(baseline)]
    if not matches:
      raise ValueError(f'get_contrasts: baseline {baseline!r} is not a value of {field!r}; '
                       f'values: {list(grid[field])}')
    checked[field] = matches[0]
  return checked


def narrow(grid: Mapping[str, Sequence[Any]], only: Sequence[str]) -> dict[str, list[Any]]:
  """Returns the grid with some axes restricted to the values named by --only.

  Args:
    grid: a validated grid.
    only: items 'FIELD=v1,v2'; FIELD is the full dotted field or its short name; values are
      matched against str() of the axis values. Kept values stay in grid order.
  Raises:
    ValueError: a malformed item, an unknown or ambiguous field, a field given twice, or a value
      not in the axis.
  """
  narrowed = {f: list(v) for f, v in grid.items()}
  seen_fields = set()
  for item in only:
    name, sep, values_text = item.partition('=')
    if not sep or not name or not values_text:
      raise ValueError(f'--only={item!r}: expected FIELD=VALUE[,VALUE...]')
    field = _resolve_field(grid, name, item)
    if field in seen_fields:
      raise ValueError(f'--only={item!r}: axis {field!r} is narrowed twice; list all its values '
                       'in one --only')
    seen_fields.add(field)
    allowed = [str(v) for v in grid[field]]
    wanted = values_text.split(',')
    unknown = [w for w in wanted if w not in allowed]
    if unknown:
      raise ValueError(f'--only={item!r}: {unknown} not among the values of {field!r}; '
                       f'allowed: {allowed}')
    narrowed[field] = [v for v in grid[field] if str(v) in wanted]
  return narrowed


def _resolve_field(grid: Mapping[str, Any], name: str, item: str) -> str:
  """Returns the grid field that `name` (full or short) denotes in --only=`item`."""
  if name in grid:
    return name
  matches = [f for f in grid if short_name(f) == name]
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise ValueError(f'--only={item!r}: {name!r} is ambiguous, it is the short name of '
                     f'{matches}; use the full field')
  allowed = sorted(set(grid) | {short_name(f) for f in grid})
  raise ValueError(f'--only={item!r}: {name!r} is not a sweep axis; allowed: {allowed}')


def apply_overrides(config, overrides: Mapping[str, Any]):
  """Sets each dotted field of `config` (an ml_collections ConfigDict) in place; returns it.

  Raises:
    ValueError: a field does not exist in the config or rejects the value's type.
  """
  for field, value in overrides.items():
    *parents, last = field.split('.')
    node = config
    try:
      for part in parents:
        node = getattr(node, part)
      if not hasattr(node, last):  # a typo must not silently add a field to an unlocked config
        raise AttributeError(f'no field {last!r}')
      setattr(node, last, value)
    except (AttributeError, KeyError, TypeError) as e:
      # KeyError's str() adds quotes; ml_collections' messages span lines.
      detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
      detail = detail.replace('\n', ' ')
      raise ValueError(f'cannot set config field {field!r} to {value!r}: {detail}') from e
  return config


def expand(grid: Mapping[str, Sequence[Any]],
           total_steps_fn: Callable[[Mapping[str, Any]], int]) -> list[Cell]:
  """Returns the cells of the grid, first axis slowest.

  Args:
    grid: a validated grid.
    total_steps_fn: overrides -> train.total_steps of the resolved config.
  """
  labels = axis_labels(list(grid))
  cells = []
  for values in itertools.product(*grid.values()):
    overrides = dict(zip(grid, values))
    name = '__'.join(f'{labels[f]}={format_value(f, v)}' for f, v in overrides.items())
    cells.append(Cell(name, overrides, int(total_steps_fn(overrides))))
  return cells


def split_config_flag(config_flag: str) -> tuple[str, str | None]:
  """Returns (path, arg) of a --config value 'PATH[:ARG]' (arg None without ':')."""
  path, sep, arg = config_flag.partition(':')
  return path, (arg if sep else None)


def load_module(path: str):
  """Returns the Python module of an experiment file, imported by path."""
  if not os.path.isfile(path):
    raise ValueError(f'--config: no such file {path!r}')
  name = '_sweep_config_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(config_flag: str, sweep_dir: str, only: Sequence[str] = ()) -> Sweep:
  """Returns the sweep declared by an experiment file ('PATH[:ARG]'), narrowed by `only`.

  Raises:
    ValueError: the file lacks get_sweep/get_config, or the grid, --only or an override is bad.
  """
  path, arg = split_config_flag(config_flag)
  path = os.path.abspath(path)
  module = load_module(path)
  for function in ('get_config', 'get_sweep'):
    if not callable(getattr(module, function, None)):
      raise ValueError(f'--config={config_flag}: the file defines no {function}(arg); a sweep '
                       'config needs both get_config and get_sweep')
  full_grid = validate_grid(module.get_sweep(arg))
  grid = narrow(full_grid, only)
  get_contrasts = getattr(module, 'get_contrasts', None)
  contrasts = validate_contrasts(get_contrasts(arg), full_grid) if callable(get_contrasts) else {}

  def total_steps(overrides):
    return apply_overrides(module.get_config(arg), overrides).train.total_steps

  all_cells = expand(full_grid, total_steps)
  names = {c.name for c in expand(grid, lambda _: 0)}
  cells = [c for c in all_cells if c.name in names]
  return Sweep(path, arg, os.path.abspath(sweep_dir), full_grid, grid, cells, all_cells,
               contrasts)


def run_py_path() -> str:
  """Returns the absolute path of the repository's run.py."""
  return os.path.join(repo_root(), 'run.py')


def repo_root() -> str:
  """Returns the repository root (the folder holding run.py and sweep.py)."""
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(sweep: Sweep, cell: Cell, python: str | None = None,
            run_py: str | None = None) -> list[str]:
  """Returns the run.py argv of a cell (python and run.py default to this interpreter and repo)."""
  return [python or sys.executable, run_py or run_py_path(), f'--config={sweep.config_flag}',
          f'--workdir={cell.workdir(sweep.sweep_dir)}'] + [
              f'--config.{f}={format_value(f, v)}' for f, v in cell.overrides.items()]


def command_line(sweep: Sweep, cell: Cell, python: str | None = None,
                 run_py: str | None = None) -> str:
  """Returns the cell's run.py command as one shell line (POSIX quoting, also a bash array's)."""
  return shlex.join(command(sweep, cell, python, run_py))


def command_lines(sweep: Sweep, python: str | None = None, run_py: str | None = None) -> list[str]:
  """Returns one shell line per cell: its `command_line`, or '# finished: <cell>'."""
  return [f'# finished: {cell.name}' if cell.finished(sweep.sweep_dir) else
          command_line(sweep, cell, python, run_py) for cell in sweep.cells]


def utc_now() -> str:
  """Returns the current UTC time as ISO 8601 text, to the second."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def write_json_atomic(data: Any, path: str) -> None:
  """Writes JSON via a temporary file, so a reader never sees half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, default=str)
    f.write('\n')
  os.replace(tmp, path)


def write_sweep_json(sweep: Sweep, only: Sequence[str] = ()) -> str:
  """Writes SWEEP_DIR/sweep.json (config, grids, cells); returns its path."""
  path = os.path.join(sweep.sweep_dir, SWEEP_FILE)
  write_json_atomic({
      'config': sweep.config_path, 'config_arg': sweep.config_arg, 'only': list(only),
      'grid': sweep.grid, 'full_grid': sweep.full_grid,
      'cells': [c.name for c in sweep.cells], 'written_utc': utc_now()}, path)
  return path


def read_cell_record(workdir: str) -> dict[str, Any] | None:
  """Returns the cell's sweep_cell.json, or None if absent or unreadable."""
  try:
    with open(os.path.join(workdir, CELL_FILE)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def record_cell(sweep: Sweep, cell: Cell, argv: Sequence[str], wall_seconds: float,
                returncode: int, cpus: Sequence[int] | None = None) -> dict[str, Any]:
  """Writes the cell's sweep_cell.json; returns it.

  wall_seconds is added to the previous record's, so a resumed cell records its total time.
  cpus are the CPU ids the cell was pinned to (null when it was not pinned).
  """
  workdir = cell.workdir(sweep.sweep_dir)
  previous = read_cell_record(workdir) or {}
  record = {
      'overrides': cell.overrides, 'command': list(argv),
      'wall_seconds': float(previous.get('wall_seconds') or 0.0) + wall_seconds,
      'returncode': int(returncode), 'cpus': None if cpus is None else list(cpus),
      'finished_utc': utc_now(), 'attempts': int(previous.get('attempts') or 0) + 1}
  write_json_atomic(record, os.path.join(workdir, CELL_FILE))
  return record
