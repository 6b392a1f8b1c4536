"""The device mesh's axis names, defined once.

Every array is laid out over two named axes: ``DP`` (data parallel: the batch's rows) and ``TP``
(tensor parallel: the vocabulary rows of the frozen tables, the draft's heads and MLP columns).
easydel names five axes; the three this project does not split have size 1
(``EASYDEL_MESH_AXES``, sizes ``(dp, 1, 1, tp, 1)``).
"""

DP = "dp"
TP = "tp"
EASYDEL_MESH_AXES = (DP, "fsdp", "ep", TP, "sp")
