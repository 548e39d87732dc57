"""The one trainer: `train_and_evaluate(config, workdir)`.

Sections (as in big_vision's train.py): the experiment (mesh, input, model, optimizer) ->
state, sharded at creation or restored -> jitted update step -> loop (metrics, checkpoints,
preemption, periodic evaluation) -> final evaluation.

Parallelism is `jax.jit` with shardings: the global batch is split over the mesh's 'data' axis,
the train state is replicated, so BatchNorm statistics are global. One compile per config.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.experimental import multihost_utils

from deepmarc_jax import atomic
from deepmarc_jax import checkpoint
from deepmarc_jax import experiment as experiment_lib
from deepmarc_jax import optimizers
from deepmarc_jax import progress
from deepmarc_jax import sharding
from deepmarc_jax.data import pipeline
from deepmarc_jax.evaluation import loop as eval_loop
from deepmarc_jax.models import meta_archs

Experiment = experiment_lib.Experiment
TrainState = experiment_lib.TrainState


METRICS = 'metrics.jsonl'  # one JSON line of averaged train metrics per logged step


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def make_train_step(exp: Experiment):
  """(state, batch, rng) -> (state, metrics); the state is donated.

  metrics['finite'] is 0 where the loss or the gradient is not finite. The step does not undo
  such an update: the loop checks every step's flag before it saves or evaluates a state
  (`train_and_evaluate`), so no checkpoint holds what a non-finite step made. A select on each
  of the state's leaves would keep the old state in the step itself, but XLA:CPU compiles
  those selects as many more kernels, and the step compiles slower (docs/benchmarks.md).
  """
  model, tx = exp.model, exp.tx
  model_loss = meta_archs.loss_fn(exp.config)

  def loss_fn(params, batch_stats, batch, rng):
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch,
                                   train=True, mutable=['batch_stats'],
                                   rngs={'sampling': rng, 'dropout': jax.random.fold_in(rng, 1)})
    loss, metrics = model_loss(outputs, exp.config.model)
    return loss, (metrics, updates['batch_stats'])

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optimizers.gradient_norm(grads, exp.config.train.optimizer)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
    return new, dict(metrics, finite=finite.astype(jnp.float32), grad_norm=grad_norm)

  replicated = sharding.replicated(exp.mesh)
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates; returns the final
  evaluation results (also written to workdir/eval_<step>.json)."""
  exp = experiment_lib.setup(config)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  ckpt = checkpoint.for_workdir(workdir, config.train.checkpoint_every_steps, writer=True)
  rng = jax.random.key(config.seed)
  state = experiment_lib.init_state(exp, rng)
  restored, resumed_step = ckpt.restore_latest_intact(checkpoint.abstract(state))
  if restored is not None:  # resume first
    state = restored
    logging.info('resumed from step %d', resumed_step)
    if is_main:
      _trim_metrics(workdir, resumed_step)
  elif config.get('init_from'):  # then the variables of a converted (or earlier) model
    state = experiment_lib.load_init_from(state, config.init_from)
    logging.info('params and batch_stats from %s', config.init_from)
  start_step = int(state.step)
  total_steps = config.train.total_steps

  batches = iter(tfds.as_numpy(pipeline.train_dataset(
      config.data, exp.builder, batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())))
  train_step = make_train_step(exp)
  detect, segment = experiment_lib.make_detect(exp), eval_loop.segment_if_configured(exp)
  if _evaluation_missed(config, workdir, start_step):
    logging.info('evaluating step %d first: the run stopped before evaluating it', start_step)
    eval_loop.write_results(writer, workdir, start_step,
                            eval_loop.evaluate_model(exp, state, detect, segment))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  bar = progress.ProgressBar(total_steps, start_step, enabled=None if is_main else False)
  preempted = checkpoint.PreemptionFlag()
  step_rng = jax.random.fold_in(rng, 1)
  history, results, loss = [], None, None
  try:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.global_batch(next(batches), exp.mesh)
        state, metrics = train_step(state, batch, step_rng)
      history.append(metrics)
      report(step)
      bar.update(step, loss)
      last, stop = step == total_steps, bool(preempted)
      save = last or stop or ckpt.should_save(step)
      evaluate_now = step % config.eval.every_steps == 0 or last
      # The steps since the last summary are checked before their state is saved or evaluated.
      if step % config.train.log_every_steps == 0 or save or evaluate_now:
        summary = _summarise(history)
        if summary['finite'] < 1.0:
          ckpt.wait()  # the latest step named below is on disk
          raise NonFiniteLossError(
              f'non-finite loss or gradient at a step in ({step - len(history)}, {step}]; '
              f'nothing after the last good checkpoint (step {ckpt.latest_step()}) is saved. '
              'Lower the learning rate or check the data.')
        history, loss = [], summary['loss']
        bar.clear()
        writer.write_scalars(step, summary)
        if is_main:
          _append_metrics(workdir, dict(step=step, **summary))
        logging.info('step %d: %s', step, {k: round(v, 4) for k, v in summary.items()})
      if save and ckpt.save(step, state, force=last or stop):
        logging.info('checkpoint at step %d', step)
      if stop:
        logging.warning('SIGTERM: checkpointed step %d and stopping', step)
        return {}
      if evaluate_now:
        bar.clear()
        with report.timed('eval'):
          results = eval_loop.evaluate_model(exp, state, detect, segment)
        eval_loop.write_results(writer, workdir, step, results)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    preempted.close()
    writer.flush()
  if results is None:  # nothing left to train: evaluate the restored state
    results = eval_loop.evaluate_model(exp, state, detect, segment)
    eval_loop.write_results(writer, workdir, int(state.step), results)
  if is_main:
    eval_loop.write_prediction_overlays(exp, state, os.path.join(workdir, 'predictions.png'),
                                        detect)
  return results


def _append_metrics(workdir: str, record: dict) -> None:
  path = os.path.join(workdir, METRICS)
  try:
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')
  except OSError as e:  # a failed write() names no file: name it
    raise OSError(e.errno, f'{e.strerror} (writing {path})') from e


def _trim_metrics(workdir: str, step: int) -> None:
  """Keeps the metrics of steps up to the resumed `step`: the resumed run logs the later ones
  again (as an uninterrupted run would), and a killed run may have left half a line."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('step', step + 1) <= step:
        kept.append(json.dumps(record) + '\n')
  atomic.write_text(path, ''.join(kept))


def _evaluation_missed(config, workdir: str, start_step: int) -> bool:
  """Whether the run resumed at an evaluation step it never evaluated: SIGTERM there stops the
  loop after the step's checkpoint and before its evaluation, so that the preempted run exits
  quickly. (A resumed run at train.total_steps evaluates anyway.)"""
  missed = (0 < start_step < config.train.total_steps
            and start_step % config.eval.every_steps == 0
            and not os.path.exists(os.path.join(workdir, f'eval_{start_step}.json')))
  if jax.process_count() > 1:  # process 0 writes the evaluations; all processes must agree
    missed = bool(multihost_utils.broadcast_one_to_all(np.asarray(missed)))
  return missed


def _summarise(history: list[dict]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
