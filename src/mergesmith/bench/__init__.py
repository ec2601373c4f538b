"""Built-in benchmark zoo (small model families trained locally), evaluation, reports, diagnostics.

Modules: ``zoo`` (registry, cache, build), ``zoo_classify`` / ``zoo_bytegpt`` (families), ``evaluate``,
``runner`` (merge + evaluate many methods), ``report`` (tables, plots, HTML), ``inspect`` (streaming
task-vector diagnostics), ``demo`` and ``cli`` (the ``demo``, ``bench`` and ``inspect`` commands).
Nothing heavy is imported here.
"""
