"""Inference-time policies (paper section 5) and their evaluation.

Import the submodules directly (``policies.spec``, ``policies.evaluator``, ...); this package
file stays empty so that importing e.g. ``policies.diffusion_policy`` does not pull in the
simulator.

* ``base``: the shared interface (``Policy``: ``attach(env)``, ``reset(task, prompt)``,
  ``act(observation) -> (7,)``), ``PolicyFailure``
* ``oracle_only``, ``flat_dp``, ``vlm_dp``, ``vlm_oracle``, ``dp_oracle``: the compositions
* ``spec``: ``PolicySpec`` + ``build_policy`` / ``build_policies`` (picklable, for worker processes)
* ``evaluator``: ``evaluate(spec, tasks, episodes, ..., envs_per_worker=B) -> EvalResult``
* ``episodes``: one episode (``run_episode``) or B side by side in one process (``run_batched``)
* ``batching``: the model calls of B policies' steps as batches (``act_steps`` requests)
* ``diffusion_policy``, ``vlm_planner``: the learned models behind them; ``vlm_runtime``: the
  planner's forward passes (lean Phi-3 + CLIP, or the library's), its KV cache of B rows
"""
