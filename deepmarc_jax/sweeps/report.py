"""The report of a sweep: final evaluations of the finished cells, averaged over seeds.

`write_report` reads each finished cell's `eval_<total_steps>.json` (and `sweep_cell.json` for
its wall time), groups the cells by all non-seed axes and writes, in the sweep dir:

  * report.md: how many cells finished (and which are missing), and a table, one row per group in
    grid order: the non-seed axis values, n (finished seeds), then in percent mask AP on the seen
    and unseen classes, box AP, mask AP from ground-truth boxes on seen/unseen classes (when the
    cells have 'segm_gt_boxes'), and the mean wall minutes per cell. With n >= 2 a value is
    `mean ± sd`, sd being the sample standard deviation (ddof=1) over seeds.
  * report.md also has, when the cells were evaluated more than once, a table per curve metric
    (CURVE_METRICS) of its mean over seeds at every evaluated step (each `eval_<step>.json` of the
    finished cells): whether AP had stopped rising by the last step.
  * report.md also has, for each contrast the sweep declares ({field: baseline}, from the
    experiment's get_contrasts), a table of paired differences: every other value of that axis
    minus the baseline, cell by cell with all other axes (the seed included) equal, as mean ± sd
    over the pairs, per combination of the other non-seed axes. Paired, because seeds share
    data order and initialisation, which a difference of means would count as spread.
  * report.png: mask AP against the first non-seed axis, seen and unseen classes side by side,
    one line per combination of the other non-seed axes, sd error bars (a second row for masks
    from ground-truth boxes).

Null (NaN) or absent values are left out of their mean, and the table counts them.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deepmarc_jax.sweeps import grid as sweep_grid

REPORT_MD = 'report.md'
REPORT_PNG = 'report.png'
GT_BOXES = 'segm_gt_boxes'


@dataclasses.dataclass(frozen=True)
class Metric:
  """A report column read from an eval JSON at a key path; values are fractions."""
  name: str
  path: tuple[str, ...]


METRICS = (
    Metric('seen mask AP', ('segm', 'seen', 'AP')),
    Metric('unseen mask AP', ('segm', 'unseen', 'AP')),
    Metric('box AP', ('bbox', 'AP')),
    Metric('seen mask AP (GT boxes)', (GT_BOXES, 'seen', 'AP')),
    Metric('unseen mask AP (GT boxes)', (GT_BOXES, 'unseen', 'AP')),
)
# The by-step tables: is AP still rising at the end? (GT-box columns only when the cells have them.)
CURVE_METRICS = ('seen mask AP', 'seen mask AP (GT boxes)', 'unseen mask AP (GT boxes)', 'box AP')
# (metric name, subplot title) per plot panel; the second row only with GT-box results.
_PANELS = ((('seen mask AP', 'seen classes'), ('unseen mask AP', 'unseen classes')),
           (('seen mask AP (GT boxes)', 'seen classes, masks from GT boxes'),
            ('unseen mask AP (GT boxes)', 'unseen classes, masks from GT boxes')))


@dataclasses.dataclass(frozen=True)
class Row:
  """A finished cell's results.

  Attributes:
    cell: the cell.
    metrics: {metric name: fraction}, NaN where the JSON has null, None where it lacks the key
      (e.g. a cell evaluated without 'segm_gt_boxes').
    has_gt_boxes: whether the eval JSON has 'segm_gt_boxes'.
    wall_minutes: total wall time from sweep_cell.json, NaN without one.
    by_step: {step: {metric name: fraction, NaN or None as in `metrics`}} for every readable
      eval_<step>.json in the workdir up to the final one, the final one included.
  """
  cell: sweep_grid.Cell
  metrics: dict[str, float | None]
  has_gt_boxes: bool
  wall_minutes: float
  by_step: dict[int, dict[str, float | None]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stat:
  """Mean and sample standard deviation of the non-null values of a column in a group.

  Attributes:
    mean: NaN when there is no value.
    sd: NaN unless there are >= 2 values.
    count: the number of values used.
    nulls: the number of null (or absent) values left out.
  """
  mean: float
  sd: float
  count: int
  nulls: int


@dataclasses.dataclass(frozen=True)
class Group:
  """The finished cells that differ only in their seed(s).

  Attributes:
    key: {non-seed field: value}, in grid order.
    cells: the names of the group's finished cells.
    stats: {metric name: Stat}.
    wall_minutes: Stat of the cells' wall minutes.
    by_step: {step: {metric name: Stat}} over the cells evaluated at that step.
  """
  key: dict[str, Any]
  cells: list[str]
  stats: dict[str, Stat]
  wall_minutes: Stat
  by_step: dict[int, dict[str, Stat]] = dataclasses.field(default_factory=dict)

  @property
  def n(self) -> int:
    """Returns the number of finished cells (seeds) in the group."""
    return len(self.cells)


@dataclasses.dataclass(frozen=True)
class Difference:
  """Cells with `field` = `value` minus their partners with `field` = `baseline`.

  Attributes:
    field: the contrasted axis.
    value: its compared value.
    baseline: its baseline value.
    key: {other non-seed field: value}, in grid order.
    pairs: the number of (cell, partner) pairs, i.e. seeds with both cells finished.
    stats: {metric name: Stat of the per-pair differences}; a pair with a null or absent value
      is left out of that metric (a null counts as a null).
  """
  field: str
  value: Any
  baseline: Any
  key: dict[str, Any]
  pairs: int
  stats: dict[str, Stat]


def _lookup(results: Mapping[str, Any], path: Sequence[str]) -> float | None:
  """Returns the number at a key path of an eval JSON: NaN if null, None if absent."""
  node: Any = results
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return math.nan if node is None else float(node)


def _read_json(path: str) -> dict[str, Any] | None:
  """Returns a JSON object from a file, None (with a warning) if unreadable."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    logging.warning('sweep report: cannot read %s: %s', path, e)
    return None
  return data if isinstance(data, dict) else None


def _metrics_of(results: Mapping[str, Any]) -> dict[str, float | None]:
  return {m.name: _lookup(results, m.path) for m in METRICS}


def _eval_steps(workdir: str, last_step: int) -> list[int]:
  """Returns the steps of the workdir's eval_<step>.json files up to last_step, ascending."""
  steps = []
  for name in os.listdir(workdir):
    stem, ext = os.path.splitext(name)
    if ext == '.json' and stem.startswith('eval_') and stem[5:].isdigit():
      if int(stem[5:]) <= last_step:
        steps.append(int(stem[5:]))
  return sorted(steps)


def collect(sweep_dir: str, cells: Sequence[sweep_grid.Cell]) -> list[Row]:
  """Returns a Row per finished cell with a readable eval JSON, in the order of `cells`."""
  rows = []
  for cell in cells:
    if not cell.finished(sweep_dir):
      continue
    results = _read_json(cell.eval_path(sweep_dir))
    if results is None:  # e.g. being written right now; it shows up as missing
      continue
    workdir = cell.workdir(sweep_dir)
    by_step = {}
    for step in _eval_steps(workdir, cell.total_steps):
      earlier = results if step == cell.total_steps else _read_json(
          os.path.join(workdir, f'eval_{step}.json'))
      if earlier is not None:
        by_step[step] = _metrics_of(earlier)
    record = sweep_grid.read_cell_record(workdir) or {}
    wall = record.get('wall_seconds')
    rows.append(Row(cell, _metrics_of(results), GT_BOXES in results,
                    math.nan if wall is None else float(wall) / 60, by_step))
  return rows


def summarize(values: Sequence[float | None]) -> Stat:
  """Returns the Stat of values: None (absent) ignored, NaN (null) counted and left out, sd with
  ddof=1."""
  values = np.asarray([v for v in values if v is not None], np.float64)
  kept = values[~np.isnan(values)]
  mean = float(np.mean(kept)) if kept.size else math.nan
  sd = float(np.std(kept, ddof=1)) if kept.size >= 2 else math.nan
  return Stat(mean, sd, int(kept.size), int(values.size - kept.size))


def non_seed_fields(grid: Mapping[str, Sequence[Any]]) -> list[str]:
  """Returns the grid's axes other than the seed (replicate) axes, in grid order."""
  return [f for f in grid if not sweep_grid.is_seed_axis(f)]


def aggregate(rows: Sequence[Row], grid: Mapping[str, Sequence[Any]]) -> list[Group]:
  """Returns one Group per combination of non-seed values that has a finished cell, grid order."""
  fields = non_seed_fields(grid)
  by_key: dict[tuple[str, ...], list[Row]] = {}
  for row in rows:
    by_key.setdefault(tuple(str(row.cell.overrides[f]) for f in fields), []).append(row)
  groups = []
  for values in itertools.product(*(grid[f] for f in fields)):
    members = by_key.get(tuple(str(v) for v in values))
    if not members:
      continue
    steps = sorted({step for r in members for step in r.by_step})
    groups.append(Group(
        dict(zip(fields, values)), [r.cell.name for r in members],
        {m.name: summarize([r.metrics[m.name] for r in members]) for m in METRICS},
        summarize([r.wall_minutes for r in members]),
        {step: {m.name: summarize([r.by_step[step][m.name] for r in members
                                   if step in r.by_step]) for m in METRICS}
         for step in steps}))
  return groups


def _minus(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def differences(rows: Sequence[Row], grid: Mapping[str, Sequence[Any]],
                contrasts: Mapping[str, Any]) -> list[Difference]:
  """Returns the paired differences of each contrast ({field: baseline}), in grid order.

  A row is paired with the baseline row whose overrides differ in `field` alone; combinations
  without a pair are left out.
  """
  fields = non_seed_fields(grid)
  result = []
  for field, baseline in contrasts.items():
    def rest(row):  # every override but the contrasted one, the seed included
      return tuple(str(v) for f, v in row.cell.overrides.items() if f != field)

    partners = {rest(r): r for r in rows if str(r.cell.overrides[field]) == str(baseline)}
    others = [f for f in fields if f != field]
    for value in grid[field]:
      if str(value) == str(baseline):
        continue
      for combo in itertools.product(*(grid[f] for f in others)):
        pairs = [(r, partners[rest(r)]) for r in rows
                 if str(r.cell.overrides[field]) == str(value)
                 and all(str(r.cell.overrides[f]) == str(c) for f, c in zip(others, combo))
                 and rest(r) in partners]
        if pairs:
          result.append(Difference(
              field, value, baseline, dict(zip(others, combo)), len(pairs),
              {m.name: summarize([_minus(a.metrics[m.name], b.metrics[m.name])
                                  for a, b in pairs]) for m in METRICS}))
  return result


def metrics_shown(rows: Sequence[Row]) -> list[Metric]:
  """Returns the metric columns: the GT-box ones only when some cell has them."""
  with_gt = any(r.has_gt_boxes for r in rows)
  return [m for m in METRICS if with_gt or m.path[0] != GT_BOXES]


def format_stat(stat: Stat, scale: float = 100.0, signed: bool = False) -> str:
  """Returns 'mean ± sd' (sd with >= 2 values), '-' without values, plus '(k null)'.

  signed: write the mean's sign, '+' included (for differences).
  """
  mean = f'{scale * stat.mean:{"+" if signed else ""}.1f}'
  if not stat.count:
    text = '-'
  elif stat.count >= 2:
    text = f'{mean} ± {scale * stat.sd:.1f}'
  else:
    text = mean
  return text + (f' ({stat.nulls} null)' if stat.nulls else '')


def markdown(sweep_dir: str, grid: Mapping[str, Sequence[Any]],
             cells: Sequence[sweep_grid.Cell], rows: Sequence[Row], groups: Sequence[Group],
             config: str | None = None, diffs: Sequence[Difference] = ()) -> str:
  """Returns the text of report.md."""
  finished = {r.cell.name for r in rows}
  missing = [c.name for c in cells if c.name not in finished]
  lines = [f'# Sweep report: {os.path.basename(os.path.normpath(sweep_dir))}', '']
  if config:
    now = datetime.datetime.now(datetime.timezone.utc)
    lines += [f'Config: `{config}`. Written {now:%Y-%m-%d %H:%M} UTC.', '']
  lines.append(f'{len(finished)} of {len(cells)} cells finished'
               + (f'; missing: {", ".join(f"`{m}`" for m in missing)}.' if missing else '.'))
  lines.append('')
  if not rows:
    lines.append('No cell has finished yet: nothing to report.')
    return '\n'.join(lines) + '\n'
  lines += _table(grid, rows, groups)
  lines += ['', _explanation(grid, rows, groups)]
  lines += _difference_tables(grid, rows, diffs)
  lines += _curve_tables(grid, rows, groups)
  return '\n'.join(lines) + '\n'


def _difference_tables(grid: Mapping[str, Sequence[Any]], rows: Sequence[Row],
                       diffs: Sequence[Difference]) -> list[str]:
  """Returns the lines of the paired-difference tables, one per contrasted axis."""
  if not diffs:
    return []
  labels = sweep_grid.axis_labels(list(grid))
  metrics = metrics_shown(rows)
  lines = ['', '## Paired differences', '',
           'Each row: the cells with the first column\'s value minus the baseline\'s cells in '
           'the same other settings and seed, in percentage points; mean ± sd over the pairs '
           '(n = seeds with both cells finished).']
  for field in dict.fromkeys(d.field for d in diffs):
    rows_of_field = [d for d in diffs if d.field == field]
    others = list(rows_of_field[0].key)
    header = [labels[field]] + [labels[f] for f in others] + ['n']
    header += [f'{m.name} (pp)' for m in metrics]
    lines += ['', f'### {labels[field]}: each value minus {rows_of_field[0].baseline}', '',
              '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for d in rows_of_field:
      cells = [f'{d.value} − {d.baseline}'] + [str(d.key[f]) for f in others] + [str(d.pairs)]
      cells += [format_stat(d.stats[m.name], signed=True) for m in metrics]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _curve_tables(grid: Mapping[str, Sequence[Any]], rows: Sequence[Row],
                  groups: Sequence[Group]) -> list[str]:
  """Returns the lines of the by-step tables (none when no cell was evaluated twice)."""
  steps = sorted({step for g in groups for step in g.by_step})
  if len(steps) < 2:
    return []
  fields = non_seed_fields(grid)
  labels = sweep_grid.axis_labels(list(grid))
  shown = {m.name for m in metrics_shown(rows)}
  no_value = summarize([])
  lines = ['', '## By evaluation step', '',
           'Each metric at every evaluation of the finished cells, mean ± sd over seeds as above '
           '(the last column is the table above). Still rising at the last step = not converged.']
  for metric in (m for m in CURVE_METRICS if m in shown):
    header = [labels[f] for f in fields] + [f'step {step}' for step in steps]
    lines += ['', f'### {metric} (%)', '', '| ' + ' | '.join(header) + ' |',
              '|' + '---|' * len(header)]
    for group in groups:
      cells = [str(group.key[f]) for f in fields]
      cells += [format_stat(group.by_step.get(step, {}).get(metric, no_value)) for step in steps]
      lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _table(grid: Mapping[str, Sequence[Any]], rows: Sequence[Row],
           groups: Sequence[Group]) -> list[str]:
  """Returns the lines of the Markdown table."""
  fields = non_seed_fields(grid)
  labels = sweep_grid.axis_labels(list(grid))
  metrics = metrics_shown(rows)
  with_wall = any(g.wall_minutes.count for g in groups)
  header = [labels[f] for f in fields] + ['n'] + [f'{m.name} (%)' for m in metrics]
  header += ['wall min'] if with_wall else []
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for group in groups:
    cells = [str(group.key[f]) for f in fields] + [str(group.n)]
    cells += [format_stat(group.stats[m.name]) for m in metrics]
    if with_wall:
      wall = group.wall_minutes
      cells.append(f'{wall.mean:.1f}' if wall.count else '-')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _explanation(grid: Mapping[str, Sequence[Any]], rows: Sequence[Row],
                 groups: Sequence[Group]) -> str:
  """Returns the note under the table: what the numbers and ± mean."""
  seeds = [f for f in grid if sweep_grid.is_seed_axis(f)]
  over = f' over {", ".join(f"`{s}`" for s in seeds)}' if seeds else ''
  text = ('COCO AP in percent of each cell\'s final evaluation (eval_<train.total_steps>.json); '
          f'n = the number of finished cells averaged{over}. "a ± b" = mean ± sample standard '
          'deviation (ddof=1) over those cells, a single number where only one value exists; '
          '"-" = no value.')
  if any(g.wall_minutes.count for g in groups):
    text += ' "wall min" = mean wall-clock minutes per cell, resumed runs included.'
  nulls = sum(g.stats[m.name].nulls for g in groups for m in metrics_shown(rows))
  if nulls:
    text += (f' {nulls} null value(s) (NaN: e.g. no ground truth in that split) were left out '
             'of their means, marked "(k null)".')
  return text


def plot(path: str, title: str, grid: Mapping[str, Sequence[Any]], rows: Sequence[Row],
         groups: Sequence[Group]) -> None:
  """Writes the mask-AP plot (PNG): x = first non-seed axis, one line per other combination."""
  # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fields = non_seed_fields(grid)
  labels = sweep_grid.axis_labels(list(grid))
  x_field, line_fields = (fields[0], fields[1:]) if fields else (None, [])
  x_values = [str(v) for v in grid[x_field]] if x_field else ['all']
  line_keys = list(itertools.product(*(grid[f] for f in line_fields)))
  panels = _PANELS if any(r.has_gt_boxes for r in rows) else _PANELS[:1]

  fig = Figure(figsize=(11, 4.2 * len(panels)), layout='constrained')
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(panels), 2, squeeze=False)
  # Lines are shifted a little sideways so that their error bars don't overlap.
  width = 0.15 / (len(line_keys) - 1) if len(line_keys) > 1 else 0.0
  for panel_row, ax_row in zip(panels, axes):
    for (metric, subtitle), ax in zip(panel_row, ax_row):
      for k, line_key in enumerate(line_keys):
        ys, errs = _line(groups, x_field, x_values, dict(zip(line_fields, line_key)), metric)
        if np.isnan(ys).all():  # no finished cell on this line (or only nulls)
          continue
        xs = np.arange(len(x_values)) + (k - (len(line_keys) - 1) / 2) * width
        label = ', '.join(f'{labels[f]}={v}' for f, v in zip(line_fields, line_key)) or None
        ax.errorbar(xs, ys, yerr=errs, marker='o', capsize=3, label=label)
      ax.set_xticks(np.arange(len(x_values)), x_values)
      ax.set_xlim(-0.5, len(x_values) - 0.5)  # every category shown, even without data
      ax.set_xlabel(labels[x_field] if x_field else '')
      ax.set_ylabel('mask AP (%)')
      ax.set_ylim(bottom=0)  # differences read at their true size
      ax.set_title(subtitle)
      ax.grid(alpha=0.3)
  if axes[0][0].get_legend_handles_labels()[0]:
    axes[0][0].legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=100)


def _line(groups: Sequence[Group], x_field: str | None, x_values: Sequence[str],
          line_key: Mapping[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (means, sds) in percent along x for one line; NaN means, 0 sds where absent."""
  ys = np.full(len(x_values), np.nan)
  errs = np.zeros(len(x_values))
  for group in groups:
    if any(str(group.key[f]) != str(v) for f, v in line_key.items()):
      continue
    i = x_values.index(str(group.key[x_field])) if x_field else 0
    stat = group.stats[metric]
    ys[i] = 100 * stat.mean
    errs[i] = 100 * stat.sd if stat.count >= 2 else 0.0
  return ys, errs


def write_report(sweep_dir: str, grid: Mapping[str, Sequence[Any]],
                 cells: Sequence[sweep_grid.Cell], config: str | None = None,
                 contrasts: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes report.md (always) and report.png (when a cell finished) in the sweep dir.

  Args:
    sweep_dir: the folder holding the cells' workdirs.
    grid: the grid the cells come from (fixes the row and x-axis order).
    cells: all cells the report covers; the unfinished ones are listed as missing.
    config: the --config text, shown in the report.
    contrasts: {field: baseline value}: paired-difference tables (see `differences`).
  Returns:
    {'markdown': path, 'png': path or None, 'rows': rows, 'groups': groups,
     'differences': the Differences}.
  """
  os.makedirs(sweep_dir, exist_ok=True)
  rows = collect(sweep_dir, cells)
  groups = aggregate(rows, grid)
  diffs = differences(rows, grid, contrasts or {})
  md_path = os.path.join(sweep_dir, REPORT_MD)
  _write_text_atomic(markdown(sweep_dir, grid, cells, rows, groups, config, diffs), md_path)
  png_path = os.path.join(sweep_dir, REPORT_PNG)
  if rows:
    tmp = png_path + '.tmp.png'
    plot(tmp, os.path.basename(os.path.normpath(sweep_dir)), grid, rows, groups)
    os.replace(tmp, png_path)
  elif os.path.exists(png_path):  # a stale plot would contradict report.md
    os.remove(png_path)
  return {'markdown': md_path, 'png': png_path if rows else None, 'rows': rows,
          'groups': groups, 'differences': diffs}


def _write_text_atomic(text: str, path: str) -> None:
  """Writes text via a temporary file, so a reader never sees half a report."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)
