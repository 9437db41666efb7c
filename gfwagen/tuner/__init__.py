"""The autotuner: search space, candidate worker, timing, the Optuna study and its plots.

- space.py: the knobs per backend and pass, and a resource model (shared memory, registers)
  that prunes configs that cannot fit before anything is compiled
- timing.py: CUDA-event timing with an L2 flush between repeats; CPU and fake timers
- worker.py: a subprocess that builds inputs, runs one candidate, checks it against the
  reference and then times it; a crash, hang or wrong result costs only that candidate
- study.py: one Optuna study per (problem, backend, pass), every trial recorded in the
  TuningDB; several devices share one study through a JournalStorage file, several hosts
  through an RDB storage URL
- plots.py: optimization history and parameter importances as PNG
"""
