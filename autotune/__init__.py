"""kiln.autotune: launch-config tuning split as in TVM's MetaSchedule, each part swappable alone:
space.py (config spaces and constraints, ``register_space``), cost.py (analytic ranking),
measure.py (timing with warm-up and a cold L2), database.py (SQLite record of measurements),
tuner.py (prune -> rank -> time top k -> store); heuristics.py holds the untimed defaults."""
