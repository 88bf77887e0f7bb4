"""Peak memory the batched mask decoder (`SamModel.decode`, the gpu layout's) takes per prompt.

Each batch size runs in a fresh process: the process's peak resident memory before and after
one `decode` of B single-point prompts on a random (1, 256, 64, 64) embedding, fp32 on the CPU.
The slope over B is the memory per prompt; the mask decoder is the same for every SAM 1 model,
so the figure holds for vit_t and vit_h alike (their encoders' weights and activations aside).

    .venv/bin/python benchmarks/decoder_memory.py [B ...]
"""

from __future__ import annotations

import resource
import subprocess
import sys

MIB = 1024  # ru_maxrss is in KiB on Linux


def growth_for(batch: int) -> float:
    """MiB the process's peak RSS grows by during one decode of `batch` prompts."""
    import torch

    from sam_batch.engines.sam import build_sam

    torch.set_num_threads(1)
    model = build_sam("vit_t")
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.rand(batch, 1, 2, dtype=torch.float64) * 1024
    labels = torch.ones(batch, 1, dtype=torch.int64)
    with torch.inference_mode():
        model.decode(embedding, coords[:1], labels[:1])  # allocator and kernels warm
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model.decode(embedding, coords, labels)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / MIB


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(growth_for(int(sys.argv[2])))
        return
    batches = [int(b) for b in sys.argv[1:]] or [16, 32, 64]
    growth = {
        b: float(subprocess.check_output([sys.executable, __file__, "--one", str(b)], text=True)) for b in batches
    }
    slope = (growth[batches[-1]] - growth[batches[0]]) / (batches[-1] - batches[0])
    print("| prompts | peak RSS growth, MiB |\n| ---: | ---: |")
    for b in batches:
        print(f"| {b} | {growth[b]:.0f} |")
    print(
        f"\nper prompt: {slope:.1f} MiB; 256 prompts: {256 * slope / 1024:.1f} GiB; "
        f"1,024: {1024 * slope / 1024:.1f} GiB"
    )


if __name__ == "__main__":
    main()
