"""The policy search on Ray Tune: ``plan`` (checks before Ray), ``searchers`` (the registry),
``trial`` (the trainable), ``ray_connection``, ``runner`` (:func:`run_search`), ``results`` and
``final`` (the best trial, re-run and saved), ``progress``. Import :func:`run_search` from
``autoprune`` or ``autoprune.search.runner``; this package's ``__init__`` imports nothing."""
