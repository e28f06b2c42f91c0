"""The preference objectives' log-probabilities: label positions alone (`label_logps`, backward recomputing each
chunk's logits) against whole logits (`logits_logps`, the baseline), forward and backward. Not a test.

    python bench/label_logps.py label      then      python bench/label_logps.py full

Each prints the fastest of 3 timed rounds (after one warm-up) and the process's peak RSS: run them as two
processes so that each peak is its own. Shapes: 8 rows of 128 tokens, half labelled, hidden 1,024, ChatGLM3's
65,024-word vocabulary, fp32.
"""

import resource
import sys
import time

import torch

from tuneport.models.loss import label_logps, logits_logps

torch.manual_seed(0)
hidden = torch.randn(8, 128, 1024, requires_grad=True)
weight = torch.randn(65024, 1024) * 0.02
labels = torch.randint(0, 65024, (8, 128))
labels[:, :64] = -100
which = sys.argv[1] if len(sys.argv) > 1 else "label"
times = []
for _ in range(4):
    start = time.perf_counter()
    out = label_logps(hidden, weight, labels) if which == "label" else logits_logps(hidden @ weight.T, labels)
    out.logps.sum().backward()
    hidden.grad = None
    times.append(time.perf_counter() - start)
print(f"{which}: {min(times[1:]):.3f} s forward and backward, peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
