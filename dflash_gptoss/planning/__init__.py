"""Planning stage: compile a run's own steps for a named TPU on this machine, before renting it.

``tpu_plan`` compiles (libtpu's AOT compiler, abstract parameters), ``cli`` is the ``--plan-tpu``
side every planning script shares, ``topologies`` the one chip table, ``model_presets`` the
packaged gpt-oss ``config.json`` files, ``real_width_snapshot`` the random-weight snapshot at
gpt-oss-20b's widths that rehearses the real scripts on CPU.
"""
