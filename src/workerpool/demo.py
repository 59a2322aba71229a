"""``make demo``: one model, N workers, one copy of the weights; the numbers that show it.

    python -m workerpool.demo [--workers 4] [--model-mib 256]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

MIB = 1024 * 1024
WIDTH = 2048


def load(model_mib: int = 256):
    """An fp32 MLP of about ``model_mib`` MiB (WIDTH x WIDTH layers)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = max(1, round(model_mib * MIB / (WIDTH * WIDTH * 4)))
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(WIDTH, WIDTH),
                                                               nn.ReLU())]).eval()


def predict(model, x):
    return model(x)


def mib(n: int) -> str:
    return f"{n / MIB:8.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workerpool demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--model-mib", type=int, default=256)
    args = parser.parse_args(argv)

    import functools

    import torch

    import workerpool as wp

    print(f"Loading a {args.model_mib} MiB model once and starting {args.workers} workers...")
    started = time.monotonic()
    with wp.Pool(functools.partial(load, args.model_mib), predict,
                 workers=args.workers) as pool:
        print(f"  ready in {time.monotonic() - started:.2f} s\n")
        x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
        results = list(pool.map([x] * (8 * args.workers)))
        stats = pool.stats()
        # the reference copy is built only after measuring, so it is not in the numbers
        with torch.inference_mode():
            torch.set_num_threads(1)
            expected = load(args.model_mib)(x)
        same = all(torch.equal(y, expected) for y in results)
        print(f"{len(results)} requests served; every output equal to the model run "
              f"in this process: {same}\n")

        model = stats["model_bytes"]
        print(f"model weights (published once, in a sealed memfd): {mib(model)}")
        print(f"{'process':>10} {'pid':>8} {'PSS':>12} {'private (USS)':>14} "
              f"{'weights resident':>17} {'requests':>9}")
        for name, row in [("parent", stats["parent"]), ("zygote", stats["zygote"])]:
            print(f"{name:>10} {row['pid']:>8} {mib(row['pss'])} {mib(row['uss']):>14}")
        for i, w in enumerate(stats["workers"]):
            print(f"{'worker ' + str(i):>10} {w['pid']:>8} {mib(w['pss'])} {mib(w['uss']):>14} "
                  f"{mib(w['weights_rss']):>17} {w['requests_served']:>9}")
        total = stats["total_pss"]
        copies = args.workers * model
        print(f"\ntotal PSS of the whole pool:            {mib(total)}")
        print(f"the weights alone, one copy per worker: {mib(copies)} "
              f"(what per-worker loading costs before any runtime)")
        print(f"ratio: {total / copies:.2f}\n")

        victim = stats["workers"][0]["pid"]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while True:
            workers = pool.stats(memory_usage=False)["workers"]
            if victim not in [w["pid"] for w in workers] and len(workers) == args.workers \
                    and all(w["state"] == "ready" for w in workers):
                break
            time.sleep(0.002)
        print(f"SIGKILLed worker {victim}; a replacement attached to the same weights and "
              f"was ready {1000 * (time.monotonic() - killed):.0f} ms later")
        assert torch.equal(pool.submit(x).result(), expected)
    print("closed: no process, socket or segment left behind")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
