"""MLflow tracking of a search: ``store`` (the store, the search run, batched logging),
``charts`` and ``note`` (the search run's description in the UI). No Ray: the Ray Tune
callback that logs trials is the search's (``autoprune.search.callback``)."""
