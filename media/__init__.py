"""Video I/O (PyAV), face detection/crop/smoothing, segmentation, landmarks and paste-back.

Shared by the workers, training and evaluation; nothing here imports torch.
"""
