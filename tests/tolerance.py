"""The tolerance policy of this suite: how two floating-point results may be compared, and why each bound holds on
any IEEE-754 machine, not just the one a test was written on.

torch picks its CPU kernels at run time (`ATEN_CPU_CAPABILITY=default|avx2|avx512`; a GPU has others), and
kernels with different vector widths or blockings sum the same terms in different orders. So a comparison is
exact only where the order cannot change; everywhere else its bound is derived from float32's rounding and the
size of the reduction, here, once. The suite passes under every capability a CPU supports:
`ATEN_CPU_CAPABILITY=default python -m pytest` (and `avx2`, `avx512`).

1. **Exact** (`torch.equal`, `==`, `atol=0`): both sides run the same operations in the same order, in one
   process, on the same kernels. Determinism with one seed; resume against an uninterrupted run; a checkpoint
   read back; a masked position that must not reach a result at all; integer results (token ids, counts);
   formulas written as the code writes them (a loss against its definition on the same tensors).
2. **Different reduction orders** (micro-batches against whole batches, two ranks against one, chunked against
   plain, a KV-cache decode against one full forward, a row alone against it in a batch): compared with a bound
   derived from the dtype and the reduction, from the constants below, or against a float64 reference.
3. **Adam-family updates** turn a rounding difference in a gradient near zero into a full step (Adam's first
   step is lr * sign(g)): compare gradients, or weights after one SGD step, never weights after Adam.
4. **Hand computations** in float64 (or exact binary fractions) compare at 1e-12; hand values written to a few
   decimals compare at the precision written.

A bound is never tuned until one CPU passes: each constant says where it comes from, and the tests that use it
would fail on a real bug by orders of magnitude more (a temperature or a position wrong moves a log-prob by
more than 1e-2).
"""

from __future__ import annotations

import torch

#: float32's machine epsilon, 2^-23: the spacing of floats at 1.0; one rounding errs by at most half of it.
EPS32 = torch.finfo(torch.float32).eps

#: Outputs (logits, log-probs, reward scores) of the same model on the same tokens from two float32 kernel paths (a
#: KV-cache decode step against one teacher-forced forward, a row alone against the same row in a padded batch,
#: micro-batches against a whole batch, merged LoRA weights against adapters, a traced step against the eager one).
#: Each logit is a dot product over the model's width d of activations that already carry rounding from the
#: layers below, and a log-softmax subtracts a log-sum-exp over the vocabulary: a reordered sum of n float32 terms
#: errs by at most n * EPS32 times the sum of their magnitudes (Higham, Accuracy and Stability of Numerical
#: Algorithms, 4.2), so with d = 64 and logits of magnitude <= 10 the bound is 64 * 1.2e-7 * 10 = 7.6e-5.
#: Measured across default, avx2 and avx512 kernels: at most 1.3e-5. A convention bug moves a log-prob by > 1e-2.
FORWARD_ATOL = 1e-4

#: Exponentials of such log-prob differences (PPO's ratio at its first minibatch, before any step): |e^x - 1| ~ |x|.
RATIO_ATOL = FORWARD_ATOL

#: Scalars that are means over a batch of such float32 terms (a loss, a KL, a logged metric): the mean of n terms
#: each within FORWARD_ATOL, divided by a count, stays within it; relative to the value where it is large.
SCALAR_RTOL = 1e-5


def grad_atol(reference: torch.Tensor, terms: int) -> float:
    """Bound on how far a float32 gradient summed over `terms` contributions (rows, micro-batches, ranks) in
    another order may move from `reference`: `terms` * EPS32 * the largest gradient entry, the same reordered-sum
    bound as FORWARD_ATOL's, with the largest entry standing for the sum of magnitudes of each entry's terms.

    >>> round(grad_atol(torch.tensor([0.5, -2.0]), terms=32), 10)
    7.6294e-06
    """
    return float(terms * EPS32 * reference.abs().max())
