"""Privacy as a pipeline over the statistics an algorithm emits (fedrec.models.algorithm).

Device side: per-user clipping (clip.py) -> decoys for padded uploads (decoys.py) -> device noise,
local or a distributed share (noise.py) -> the upload's shape (upload.py); device.py runs them in
order around the algorithm's training. SecAgg+ quantization is sized in secagg.py. Server side:
central noise (noise.py) on the checked sum, the accountant (accountant.py), and what a run may
release (ledger.py) and claims (guarantee.py). No stage looks inside an algorithm; no algorithm
adds noise itself. Nothing here imports Flower.
"""
