"""MLflow tracking of a search: ``store`` (the store, the search run, batched logging; no Ray),
``callback`` (the Ray Tune callback that logs trials, from the driver; the only module here
that imports Ray), ``resume`` (what ``--resume`` replays), ``charts`` and ``note`` (the search
run's description in the UI)."""
