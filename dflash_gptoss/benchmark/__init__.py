"""Benchmark stage: the KV-cache baseline against DFlash on the same prompts, and the figures behind it.

``core`` runs both decode loops (``dflash_gptoss.decoding``) interleaved and writes the report,
``stats`` holds the arithmetic of medians and spreads, ``decode_costs`` the per-step costs,
``prompts`` where prompts come from, ``pipeline_report`` the end-to-end run's closing table and
``measure_step`` the wall-time / peak-memory wrapper of the benchmark scripts.
"""
