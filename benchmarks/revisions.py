"""The same workloads timed on two revisions of the library, interleaved, for regressions.

``python -m benchmarks.revisions --base HEAD~3`` checks out ``--base`` into a temporary git worktree
and times each workload alternately in a fresh subprocess of the working tree and of the base
(``--rounds`` times each, single-threaded), then prints the medians and their ratio. Interleaving
makes a busy machine slow both sides alike. The workloads use only calls whose spelling is the same
on both sides: ``il.solve`` by name, and the iMixer's training step through ``timm.create_model``.

Workloads (per call, seconds):

* ``solve/<size>/<solver>``: ``il.solve`` on the slow tanh problem (D = 256, ||W|| = 0.99, tol 1e-6),
  ``small`` with B = 64 samples (dispatch-bound), ``large`` with B = 4096 (as many rows as a token
  mixer of ``imixer_t4_32`` at batch 32: arithmetic-bound);
* ``imixer_step``: one training step (forward, loss, backward, AdamW) of ``imixer_t4_32`` on 28 px
  grayscale images, batch 32, the model's default settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO

WORKLOAD = r"""
import json, time, warnings
import torch  # the subprocess runs in the tree's root, whose implicitlayers comes first on sys.path
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import implicitlayers as il
from implicitlayers.problems import symmetric_tanh_problem

def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

out = {}
for size, batch in (("small", 64), ("large", 4096)):
    problem = symmetric_tanh_problem(256, batch, seed=0, norm=0.99, dtype=torch.float32)
    for solver in ("picard", "anderson", "broyden"):
        run = lambda: il.solve(problem, torch.zeros_like(problem.drive), solver=solver, tol=1e-6, max_iter=400)
        out[f"solve/{size}/{solver}"] = timed(run, 5 if size == "small" else 3)

import timm
from examples.imixer import imixer  # registers the models
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


def run_once(root: Path) -> dict[str, float]:
    """One subprocess timing every workload on the tree at ``root``."""
    done = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, cwd=root, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each side")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            samples: dict[str, dict[str, list[float]]] = {"new": {}, "base": {}}
            for _ in range(args.rounds):
                for side, root in (("new", REPO), ("base", base)):
                    for name, seconds in run_once(root).items():
                        samples[side].setdefault(name, []).append(seconds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=True)
    summary = {}
    print(f"| workload | base {args.base} (s) | working tree (s) | ratio |")
    print("| --- | --- | --- | --- |")
    for name in samples["new"]:
        old, new = statistics.median(samples["base"][name]), statistics.median(samples["new"][name])
        summary[name] = {"base": old, "new": new, "ratio": new / old}
        print(f"| {name} | {old:.4f} | {new:.4f} | {new / old:.3f} |")
    return summary


if __name__ == "__main__":
    main()
