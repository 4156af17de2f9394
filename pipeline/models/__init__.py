"""Shipped model files of the learned change detector (made by ``bench/train_detector.py``).

``learned_<set>.txt`` is a LightGBM text model and ``learned_<set>.json`` its sidecar (feature
list, training cases, calibration, held-out figures and licence lineage). The weights derive
from LEVIR-CD and OSCD, which are licensed for research use only.
"""
