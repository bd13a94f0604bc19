"""A fixed sampling problem for chi-square tests of lossless speculative sampling, shared by the CPU kernel
tests and the GPU ones: the first emitted token must be distributed as softmax(L_0 / T)."""

import torch

from autojudge.kernels.reference import sampling_probs

# chi2.ppf(1 - 1e-4, df=7) = 29.88: a correct sampler fails a test once in 10^4 seeds (and the
# seeds are fixed), while the wrong-residual sampler scores in the hundreds (asserted in the CPU tests).
CHI2_DF7_CRIT = 29.88
STAT_V, STAT_T = 8, 0.9


def stat_problem(k):
    """A fixed target/draft pair: acceptance 0.4-0.7, every p_0(x) > 0.013 (chi-square needs counts)."""
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(1, k + 1, STAT_V, generator=gen)
    draft_logits = torch.randn(1, k, STAT_V, generator=gen)
    return logits, torch.softmax(draft_logits / STAT_T, -1)


def sample_first_tokens(verify_fn, k, trials, seed, device="cpu"):
    """One verify call whose batch rows are `trials` independent draws of the same problem."""
    logits, q = (t.to(device) for t in stat_problem(k))
    gen = torch.Generator().manual_seed(seed)
    q = q.expand(trials, k, STAT_V)
    draft = torch.multinomial(q.reshape(-1, STAT_V).cpu(), 1, generator=gen).reshape(trials, k).to(device)
    out = verify_fn(logits.expand(trials, -1, -1), draft, temperature=STAT_T, draft_probs=q, seed=seed)
    return torch.where(out.num_accepted > 0, draft[:, 0], out.next_token), out, draft


def chi_square(tokens, k):
    p = sampling_probs(stat_problem(k)[0][0, 0], STAT_T)
    counts = torch.bincount(tokens.cpu(), minlength=STAT_V).double()
    expected = p.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())
