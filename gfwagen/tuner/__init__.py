"""The autotuner: search space, candidate worker, timing, the Optuna study and its plots.

- space.py: the knobs per backend and pass, and a resource model (shared memory, registers)
  that prunes configs that cannot fit before anything is compiled
- timing.py: CUDA-event timing with an L2 flush between repeats; CPU and fake timers
- worker.py: a subprocess that builds inputs, runs one candidate, checks it against the
  reference and then times it; a crash, hang or wrong result costs only that candidate
- pool.py: the timing worker plus a pool of warm workers that compile a batch of
  candidates in parallel before the timing worker times them one by one
- search.py: how a study spends its trials around TPE: warm start from the nearest tuned
  problems, one config per tile, and a closing refinement of the best tiles' pipelines
- study.py: one Optuna study per (problem, backend, pass), batched ask/tell, every trial
  recorded in the TuningDB; several devices share one study through a JournalStorage file,
  several hosts through an RDB storage URL; the exhaustive sweep in its own "-sweep" study
- lease.py: file locks that keep a fresh run from resetting a journal study another driver
  on this host is running
- compare.py: TPE's best against the sweep's (benchmarks/tuner_vs_sweep.py)
- replay.py: the tuner's driver answered from a recorded sweep, to judge the search without
  a GPU (benchmarks/tuner_replay.py)
- plots.py: optimization history and parameter importances as PNG
"""
