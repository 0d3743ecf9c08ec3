"""The GRPO objective as small pure tensor functions.

Symbols follow DeepSeekMath (arXiv 2402.03300), eq. (3):

    J(theta) = 1/G sum_i 1/|o_i| sum_t { min[rho_it A_it, clip(rho_it, 1-eps, 1+eps) A_it]
                                          - beta D_KL[pi_theta || pi_ref] }

with rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t) and A_it = A_i, the
group-normalised reward of completion i. The loss we minimise is -J.

Shapes: N = B*G completions (grouped contiguously: rows g*G .. g*G+G-1 share a prompt),
T = longest completion in the batch. ``mask`` is 1 on real completion tokens, 0 on padding.
Nothing here knows about Lightning, Hydra, models or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: str = "group_std",
    eps: float = 1e-6,
    unbiased_std: bool = False,
) -> Tensor:
    """Group-relative advantages, one per completion.

    A_i = (r_i - mean_g(r)) / (std(r) + eps)

    rewards: (B*G,) grouped contiguously by prompt.
    scale:
      - ``group_std``: divide by the std of the completion's own group (GRPO, the default);
      - ``batch_std``: divide by the std over the whole batch (group mean still subtracted);
      - ``none``: subtract the group mean only (Dr. GRPO);
      - ``rloo``: leave-one-out baseline A_i = r_i - mean_{j != i} r_j (RLOO), no scaling.
    unbiased_std: Bessel's correction (divide by G-1, as TRL does); the default is the
      population std (divide by G), so rewards half 1 and half 0 give A = +1 / -1.

    A group whose rewards are all equal gets A = 0 exactly: the numerator is 0 and eps
    keeps the denominator positive.
    Returns: (B*G,) in the rewards' dtype.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}; "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # (B, G)
    live = ~_constant_groups(grouped).unsqueeze(1)  # (B, 1)
    mean = grouped.mean(dim=1, keepdim=True)
    if scale == "rloo":
        # mean of the other G-1 rewards: (G*mean - r_i) / (G-1)
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        return torch.where(live, grouped - baseline, 0.0).reshape(-1)
    # The float mean of equal rewards can miss them by an ulp (8 x 0.7 -> 6e-8), and
    # dividing by std + eps would blow that up to A ~ 0.06; a constant group is exactly 0.
    centred = torch.where(live, grouped - mean, 0.0)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group_std":
        std = grouped.std(dim=1, keepdim=True, unbiased=unbiased_std)
    elif scale == "batch_std":
        std = rewards.std(unbiased=unbiased_std)
    else:
        raise ValueError(f"scale={scale!r}; allowed: group_std, batch_std, none, rloo")
    return (centred / (std + eps)).reshape(-1)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Population std of each group's rewards, (B,). Zero marks a group with no signal."""
    grouped = rewards.view(-1, group_size)
    std = grouped.std(dim=1, unbiased=False)
    return torch.where(_constant_groups(grouped), 0.0, std)


def _constant_groups(grouped: Tensor) -> Tensor:
    """(B,) True where every reward of the group (B, G) equals the first one."""
    return (grouped == grouped[:, :1]).all(dim=1)


# --------------------------------------------------------------------------- log-probs


def selective_log_softmax(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] without materialising the full log-softmax.

    logits: (..., V); tokens: (...) int. Returns (...) in float32 or wider.
    log p(x) = z_x - logsumexp(z): one gather and one reduction over V.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution, (...,) from logits (..., V)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# --------------------------------------------------------------------------- KL estimators


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi_theta - log pi_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 1/2 (log pi_theta - log pi_ref)^2 (biased, low variance, >= 0)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (the paper's estimator, unbiased, >= 0)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) by the named estimator, same shape as logp."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"kl estimator={estimator!r}; allowed: {sorted(KL_ESTIMATORS)}") from None
    return fn(logp, ref_logp)


# --------------------------------------------------------------------------- surrogate


def importance_log_ratio(
    logp: Tensor, old_logp: Tensor, mask: Tensor, level: str = "token"
) -> Tensor:
    """log rho per token, (N, T).

    level ``token``: log pi_theta(o_t) - log pi_old(o_t) (GRPO).
    level ``sequence``: GSPO's length-normalised sequence ratio
      log s_i = 1/|o_i| sum_t (log pi_theta - log pi_old), broadcast to every token, with the
      gradient of each token flowing through its own log pi_theta (GSPO-token form).
    """
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        lengths = mask.sum(dim=1).clamp(min=1)
        seq = _zero_padding(log_ratio, mask).sum(dim=1) / lengths  # (N,)
        # value = seq ratio, gradient = per-token d logp / |o_i|, as GSPO-token.
        return seq.detach().unsqueeze(1) + logp - logp.detach()
    raise ValueError(f"importance ratio level={level!r}; allowed: token, sequence")


def clipped_surrogate(
    log_ratio: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> Tensor:
    """PPO-clip surrogate per token, (N, T): min(rho A, clip(rho, 1-eps_low, 1+eps_high) A).

    log_ratio: (N, T) log rho. advantages: (N,) broadcast over tokens, or (N, T).
    dual_clip: c > 1 bounds the objective of negative-advantage tokens below by c*A
      (Ye et al. 2020), so a huge ratio on a bad token cannot dominate the loss.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)
    return surrogate


def clip_fractions(
    log_ratio: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> dict[str, Tensor]:
    """Fractions of real tokens where clipping removed the gradient (TRL's names).

    low: rho < 1-eps_low with A < 0; high: rho > 1+eps_high with A > 0; region: either.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(_zero_padding(log_ratio.detach(), mask))
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
    n = mask.sum().clamp(min=1)
    return {
        "low": (low * mask).sum() / n,
        "high": (high * mask).sum() / n,
        "region": ((low + high) * mask).sum() / n,
    }


# --------------------------------------------------------------------------- aggregation

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def aggregate(
    per_token: Tensor, mask: Tensor, mode: str = "seq_mean_token_mean", max_len: int | None = None
) -> Tensor:
    """Reduce a per-token loss (N, T) to a scalar; padding (mask == 0) never counts.

    seq_mean_token_mean: 1/N sum_i 1/|o_i| sum_t x_it (the paper's form)
    token_mean:          sum_it x_it / sum_i |o_i|   (DAPO)
    seq_mean_token_sum_norm: 1/N sum_i 1/L sum_t x_it with a constant L = max_len (Dr. GRPO)
    """
    masked = _zero_padding(per_token, mask)
    mask = mask.to(per_token.dtype)
    if mode == "seq_mean_token_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("aggregation seq_mean_token_sum_norm needs max_len")
        return (masked.sum(dim=1) / max_len).mean()
    raise ValueError(f"aggregation={mode!r}; allowed: {', '.join(AGGREGATIONS)}")


# --------------------------------------------------------------------------- the loss


@dataclass
class LossStats:
    """Detached diagnostics of one loss evaluation (scalars)."""

    loss: Tensor
    surrogate: Tensor
    kl: Tensor
    entropy: Tensor
    clip_low: Tensor
    clip_high: Tensor
    clip_region: Tensor
    ratio_mean: Tensor


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
    aggregation: str = "seq_mean_token_mean",
    max_len: int | None = None,
    ratio_level: str = "token",
    dual_clip: float | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, LossStats]:
    """-J_GRPO for a batch of completions, plus detached diagnostics.

    logp, old_logp, ref_logp, entropy: (N, T); advantages: (N,) or (N, T); mask: (N, T).
    per-token loss = -(surrogate - beta * KL) - entropy_coef * H, then ``aggregate``.
    With mu = 1 and old_logp = logp.detach() the ratio is 1, so the loss value is -mean(A)
    (about 0 after group normalisation) while its gradient is -A grad log pi / |o_i|.

    Log-probs on padding may be anything (-inf from a masked logit): they are set to 0 before
    any exp, because selecting the output afterwards keeps the value finite but not the
    gradient (the unselected branch's inf times the zero upstream gradient is NaN).
    """
    logp, old_logp = _zero_padding(logp, mask), _zero_padding(old_logp, mask)
    if ref_logp is not None:
        ref_logp = _zero_padding(ref_logp, mask)
    if entropy is not None:
        entropy = _zero_padding(entropy, mask)
    log_ratio = importance_log_ratio(logp, old_logp, mask, ratio_level)
    surrogate = clipped_surrogate(log_ratio, advantages, eps_low, eps_high, dual_clip)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        per_token = per_token - entropy_coef * entropy
    loss = aggregate(per_token, mask, aggregation, max_len)

    with torch.no_grad():
        fr = clip_fractions(log_ratio, advantages, mask, eps_low, eps_high)
        stats = LossStats(
            loss=loss.detach(),
            surrogate=aggregate(surrogate.detach(), mask, aggregation, max_len),
            kl=masked_mean(kl.detach(), mask),
            entropy=masked_mean(entropy.detach(), mask)
            if entropy is not None
            else torch.tensor(0.0),
            clip_low=fr["low"],
            clip_high=fr["high"],
            clip_region=fr["region"],
            ratio_mean=masked_mean(torch.exp(log_ratio.detach()), mask),
        )
    return loss, stats


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding set to 0. Selecting, not multiplying: inf * 0 would be NaN, and an
    estimator can overflow on padding tokens the policy finds very unlikely."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over positions where mask is 1."""
    return _zero_padding(x, mask).sum() / mask.to(x.dtype).sum().clamp(min=1)


def kl_penalised_rewards(
    rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, estimator: str
) -> Tensor:
    """KL as a reward penalty (PPO/RLHF style) instead of a loss term.

    r_i' = r_i - beta * sum_t KL_t(o_i): the penalty enters the advantages and carries no
    gradient of its own. rewards: (N,); logp, ref_logp, mask: (N, T). Returns (N,).
    """
    kl = kl_estimate(
        _zero_padding(logp, mask).detach(), _zero_padding(ref_logp, mask).detach(), estimator
    )
    return rewards - beta * _zero_padding(kl, mask).sum(dim=1)
