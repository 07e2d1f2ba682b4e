"""The trainer: learn the embedding from the catalog's own pixels and clicks, and measure it.

- ``augment.py``   SimCLR views (PIL/numpy), ending in the serving preprocessing
- ``data.py``      labelled folders, held-out split, pair CSVs, click pairs from Kafka, datasets
- ``losses.py``    NT-Xent and InfoNCE with in-batch (and hard) negatives
- ``train.py``     the loop and the export (``vsearch train``)
- ``negatives.py`` hard negatives mined from the current Milvus index
- ``clicks.py``    click pairs from search.events: position-based click model (EM), inverse-propensity
                   weights, skip-above negatives
- ``distributed.py`` several processes under torchrun (DDP): gathered negatives, global batch norm
- ``metrics.py``   MRR, recall@k, precision@k, mAP, mAP@R, nDCG@k (pure numpy)
- ``evaluate.py``  models vs baselines on a labelled folder or judgments (``vsearch evaluate``)

    vsearch train --data ../shared/data/caltech101 --arch resnet-tiny --image-size 96 --out runs/t --holdout 0.3
    vsearch evaluate --model-dir runs/t --data ../shared/data/caltech101 --split held-out \\
        --baselines raw-pixels,random-init
    torchrun --nproc-per-node 2 .venv/bin/vsearch train --data ... --out runs/ddp   # or --nproc-per-node 2
"""

# This folder is the package vsearch.trainer (the checkout's trainer/ links here). Imported under any other
# name (`import trainer` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.trainer":
    raise ImportError(f"import vsearch.trainer, not {__name__}: trainer/ is a link to the package vsearch.trainer")
