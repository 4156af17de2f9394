"""Shipped model files of the learned change detector (made by ``bench/train_detector.py``).

``learned_<set>.txt`` is a LightGBM text model and ``learned_<set>.json`` its sidecar (feature
list, training cases, calibration, held-out figures and licence lineage);
``learned_<set>_objects.{txt,json}`` is the object stage's model (:mod:`pipeline.detect.objects`;
the detector runs without it when absent). The weights derive
from LEVIR-CD and OSCD, which are licensed for research use only.
"""
