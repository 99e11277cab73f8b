"""Measurement scripts: speed, memory and file sizes, apart from the four study programs.

Each is `python -m experiments.bench.<name>` (the Makefile's `bench*` targets run the common
ones); the results they write live under docs/ (docs/RESULTS.md says which command made which
table).

- `runs`: whole-run wall time and peak RSS per method, and per-step cost ratios (`make bench`);
- `gpu`: training images/s and peak device memory per method on an accelerator
  (`make bench-gpu`);
- `step`: the library's EsaCL step against a DER++ step (`make bench-step`);
- `sdp`: `sdp_transform` against plain SGD and `optax.contrib.sam` in a user's loop
  (`make bench-sdp`);
- `profile_startup`: where a whole run's time goes (imports, data, compilations, training);
- `ray_overhead`: the Ray launcher's cost per run against the local process pool;
- `sparse_inference`: dense against sparse matmuls of a 90%-sparse MLP on the CPU;
- `export_sizes`, `eval_export`: sizes of `esacl_jax.export` files, accuracy of an exported
  model (docs/SPARSE_EXPORT.md);
- `time_vs_mammoth.sh`: paired whole-run timing against a mammoth checkout;
- `seed_group`: N seeds as one vmapped group against N separate cold and warm processes
  (`make bench-seeds`, docs/SEED_GROUPS.md);
- `soak_stops`: runs stopped at random moments in every way, their statuses, lines and restarts
  (docs/robustness/EXITS.md).
"""
