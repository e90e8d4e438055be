"""The same workloads timed on two revisions of the library, interleaved, for regressions.

Usage: ``python -m benchmarks.revisions --base REV [--rounds N]``; benchmarks/README.md, "Two revisions compared"."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from benchmarks.common import REPO
from examples.common import OneLineArgumentParser, int_range

# Run in each tree's root (its implicitlayers first on sys.path): only calls spelled alike in both revisions.
WORKLOAD = r"""
import json, timeit, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import implicitlayers as il
from implicitlayers.problems import symmetric_tanh_problem
def timed(fn, repeats):  # the median of `repeats` calls after a warm-up call, garbage collection on
    return sorted(timeit.repeat(fn, "gc.enable()", number=1, repeat=repeats + 1)[1:])[repeats // 2]
out = {}
for size, batch, repeats in (("small", 64, 5), ("large", 4096, 3)):
    problem = symmetric_tanh_problem(256, batch, seed=0, norm=0.99, dtype=torch.float32)
    for solver in ("picard", "anderson", "broyden"):
        run = lambda: il.solve(problem, torch.zeros_like(problem.drive), solver=solver, tol=1e-6, max_iter=400)
        out[f"solve/{size}/{solver}"] = timed(run, repeats)
import timm, examples.imixer.imixer  # the latter registers the models with timm
torch.manual_seed(0)
net = timm.create_model("imixer_t4_32", img_size=28, in_chans=1, patch_size=4, num_blocks=4, embed_dim=128)
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(images), labels).backward()
    optimizer.step()
out["imixer_step"] = timed(step, 5)
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int_range(1), default=5, help="alternating runs of each side")
    args = parser.parse_args(argv)
    samples: dict[str, dict[str, list[float]]] = {"new": {}, "base": {}}
    python = partial(subprocess.run, [sys.executable, "-c", WORKLOAD], capture_output=True, text=True, check=True)
    with tempfile.TemporaryDirectory() as folder:
        base, git = Path(folder) / "base", partial(subprocess.run, cwd=REPO, check=True)
        added = git(["git", "worktree", "add", "--detach", str(base), args.base], capture_output=True, text=True,
                    check=False)  # fmt: skip
        if added.returncode:  # not a revision of this repository, say: git's own last line
            parser.error(f"--base {args.base!r}: " + (added.stderr.strip().splitlines() or ["git worktree failed"])[-1])
        try:  # the sides alternate, so that a busy machine slows both alike
            for side, root in (("new", REPO), ("base", base)) * args.rounds:
                timings = json.loads(python(cwd=root).stdout.strip().splitlines()[-1])  # a fresh process each time
                for name, seconds in timings.items():
                    samples[side].setdefault(name, []).append(seconds)
        finally:
            git(["git", "worktree", "remove", "--force", str(base)])
    print(f"| workload | base {args.base} (s) | working tree (s) | ratio |\n| --- | --- | --- | --- |")
    summary = {}
    for name in samples["new"]:
        old, new = statistics.median(samples["base"][name]), statistics.median(samples["new"][name])
        summary[name] = {"base": old, "new": new, "ratio": new / old}
        print(f"| {name} | {old:.4f} | {new:.4f} | {new / old:.3f} |")
    return summary


if __name__ == "__main__":
    main()
