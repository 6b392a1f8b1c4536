"""Run safety: what keeps a long job's outputs whole when it is killed, doubled, or the disk fills.

``preflight`` checks every output path before expensive work, ``job_lock`` holds one writer per
output folder, ``integrity`` writes and verifies the manifests of finished outputs,
``stop_signals`` turns Ctrl-C / SIGTERM into clean stops, ``report_stem`` reserves report names.
"""
