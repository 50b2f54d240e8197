"""The training driver, module by module (the public entry points are re-exported by :mod:`orcal.train`).

``config`` what defines a run; ``runtime`` seeds, devices, autocast, torch.distributed; ``checkpoint`` atomic
checkpoints and resume; ``data`` the seeded training view and batching; ``objective`` the loss of a method;
``loop`` the training loop; ``predict`` inference on whole images and sliding windows.
"""
