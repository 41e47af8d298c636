"""Is the data pipeline the bottleneck of training? Our training steps fed from the decoded uint8 cache
(indexing, conversion, augmentation: what `saliencylab train` does) against the same steps on float
tensors already in memory, interleaved batch by batch in one run.

    python benchmarks/bench_training.py --data data/phantoms --image-size 128 --batches 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="cxr_cnn")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--images", type=int, default=4096, help="images to decode into the cache")
    args = ap.parse_args()

    from saliencylab.data.datasets import load_dataset
    from saliencylab.train import TrainConfig, augment, build_classifier, decode_cache, to_batch

    ds = load_dataset(args.data)
    rng = np.random.default_rng(0)
    records = [ds.records[i] for i in rng.permutation(len(ds.records))[: args.images]]
    cfg = TrainConfig(data=args.data, model=args.model, image_size=args.image_size)
    clf, _, _ = build_classifier(cfg)
    t0 = time.perf_counter()
    cache, _ = decode_cache(ds, records, clf.input_size[0], progress=False)
    decode_s = time.perf_counter() - t0
    labels = np.array([r.label for r in records])
    model = clf.module.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    # the in-memory reference: the same batches, already converted and augmented, as float tensors
    batches = [rng.permutation(len(records))[: args.batch_size] for _ in range(args.batches)]
    ready = [augment(to_batch(cache, idx, clf.channels), torch.Generator().manual_seed(i)) for i, idx in
             enumerate(batches)]

    def step(x: torch.Tensor, idx: np.ndarray) -> None:
        y = torch.from_numpy(labels[idx]).float()
        loss = F.binary_cross_entropy_with_logits(model(x.contiguous(memory_format=torch.channels_last))[:, 0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):  # warm-up
        step(ready[i], batches[i])
    ours, memory = 0.0, 0.0
    for i, idx in enumerate(batches):
        t = time.perf_counter()
        step(augment(to_batch(cache, idx, clf.channels), gen), idx)  # what train() does per batch
        ours += time.perf_counter() - t
        t = time.perf_counter()
        step(ready[i], idx)
        memory += time.perf_counter() - t
    n = args.batches * args.batch_size
    print(f"{args.model} at {clf.input_size[0]}px, batch {args.batch_size}, {args.batches} batches each, interleaved")
    print(f"decode cache: {len(records)} images in {decode_s:.1f}s ({len(records) / decode_s:.0f} images/s)")
    print(f"from the cache (ours):      {n / ours:8.1f} images/s")
    print(f"from tensors in memory:     {n / memory:8.1f} images/s")
    print(f"ratio ours / in-memory:     {memory / ours:8.2f}  (goal: at least 0.8)")


if __name__ == "__main__":
    main()
