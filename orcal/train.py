"""The training driver: ordinal rater consensus or any baseline strategy, one GPU, many GPUs or the CPU.

>>> from orcal.data import load_dataset
>>> from orcal.train import TrainConfig, train, predict
>>> data = {"n": 8, "shape": (16, 16), "R": 3}
>>> result = train(TrainConfig(dataset="synthetic", dataset_options=data, arch="unet-small", epochs=1,
...                            batch_size=4, max_steps_per_epoch=1), progress=False)
>>> for case_id, p, masks, valid in predict(result, load_dataset("synthetic", split="test", **data)):
...     assert p.shape == masks.shape[1:] and 0 <= float(p.min()) <= float(p.max()) <= 1

* Seeded: the model init, the data order (a per-epoch permutation), augmentations and patches (seeded per
  epoch and sample), and the ``random`` strategy's rater draw (seeded per epoch and rank) depend only on the
  seed, so a run is reproducible and a resumed run repeats exactly what an uninterrupted one does.
* The target is computed per batch on the device with :func:`orcal.fusion.make_target`.
* Model selection on the validation loss (the training loss against the validation set's target).
* Checkpoints: ``out_dir/last.pt`` (everything needed to resume) and ``out_dir/best.pt`` (the selected
  weights), written atomically (:mod:`orcal.training.checkpoint`).
* Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, the
  data sharded with a ``DistributedSampler`` (gloo on CPU, nccl on GPU), the validation loss summed over
  ranks; only rank 0 writes checkpoints and shows progress bars.

The code lives in :mod:`orcal.training`, one module per concern; this module is its public face.
"""

from orcal.training.checkpoint import (
    BEST,
    CHECKPOINT_VERSION,
    LAST,
    RESUME_KEYS,
    RESUME_MAY_CHANGE,
    atomic_save,
    clean_stale_temporaries,
    load_model,
)
from orcal.training.config import AMP_MODES, TrainConfig, TrainResult
from orcal.training.data import collate
from orcal.training.loop import cosine_lr, train
from orcal.training.predict import predict
from orcal.training.runtime import seed_everything

__all__ = ["AMP_MODES", "BEST", "CHECKPOINT_VERSION", "LAST", "RESUME_KEYS", "RESUME_MAY_CHANGE", "TrainConfig",
           "TrainResult", "atomic_save", "clean_stale_temporaries", "collate", "cosine_lr", "load_model", "predict",
           "seed_everything", "train"]
