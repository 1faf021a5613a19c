"""PPO with a KL penalty for a sequence policy, as pure tensor functions (imports only torch).

Nothing here knows about T5 or empathy: every function takes (B, T) tensors over the generated reply
tokens and a mask: 1 on real reply tokens (the EOS token included), 0 on padding after EOS, as int,
bool or float. Where a function averages over the mask (masked_mean, policy_loss, value_loss),
non-negative float weights are accepted too, as GRPO's per-reply weights 1/|y_i|. Tensor outputs
come in the dtype of the float inputs (float32 for integer ones); no input is changed in place.

Shape legend: B batch (rollouts), T reply tokens, V vocab.

One PPO iteration (numbered the same way in emprl.py, train.py, README and tests):
  1. rollout (no grad): sample replies; record logprobs, ref_logprobs and values of every reply
     token.
  2. reward: scores -> normalize_scores (RunningMoments); kl_penalized_rewards puts -β·KL_t on every
     real token and the score on the last real token; masked_whiten(rewards, shift_mean=False).
  3. GAE: gae(rewards, values, mask, γ, λ) -> advantages, returns (or RLOO: rloo_advantages);
     masked_whiten. GRPO: grpo_advantages of the scores alone, and β·k3 per token (per_token_kl)
     added to the loss in step 4.
  4. epochs × shuffled minibatches: policy_loss + vf_coef · value_loss, clipped updates.
  5. statistics: approx_kl, clipfrac, entropy_from_logits, explained_variance; β <- KL controller.
  6. eval and checkpoint (RunningMoments and the KL controller have state_dict / load_state_dict).

Deviations from TRL 0.9.6 (the authors' PPOTrainer):
  - Every generated token counts, including the first (TRL masks the first decoder token out for
    encoder-decoders).
  - The per-token KL is clamped to [kl_min, kl_max] = [0, 10]: non-negative and bounded. Unclamped,
    log π - log π_ref can go negative and the policy earns a bonus by flattening its distribution.
  - Score normalisation uses running moments over all scores so far (TRL's use_score_scaling +
    use_score_norm); rewards are whitened scale-only (TRL's whiten_rewards, shift_mean=False).
  - masked_whiten and gae multiply their outputs by the mask, so nothing lands after EOS (TRL leaves
    non-zero values at padding positions; they are masked out of every loss, so the losses agree).
"""

import math

import torch

# ----------------------------------------------------------------------------- masked statistics


def masked_mean(x, mask):
    """mean_m(x) = Σ x·m / Σ m over all elements. An all-zero mask gives nan."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask, unbiased=True):
    """var_m(x) = mean_m((x - mean_m(x))²), times n/(n-1) with n = Σ m when unbiased (Bessel)."""
    mask = mask.to(x.dtype)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:  # Bessel's correction divides by n - 1
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 real tokens, the mask has {int(n)}"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8, total=None):
    """whiten(x) = (x - mean_m(x)) / sqrt(var_m(x) + eps) [+ mean_m(x) when not shift_mean], times
    m.

    shift_mean=False keeps the mean and only rescales (TRL's reward whitening). Padding stays 0.
    mean_m and var_m (unbiased) are sums over x's elements; `total`, if given, turns such a sum into
    a sum over a larger batch held elsewhere (under torchrun, machine.all_sum: the global batch)."""
    total = total or (lambda s: s)
    m = mask.to(x.dtype)
    n = total(m.sum())
    if n < 2:  # Bessel's correction divides by n - 1
        raise ValueError(f"masked_whiten needs at least 2 real tokens, the mask has {int(n)}")
    mean = total((x * m).sum()) / n
    var = total(((x - mean) ** 2 * m).sum()) / n * n / (n - 1)  # = masked_var(x, mask) unbiased
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


# ----------------------------------------------------------------------------- 2. reward


class RunningMoments:
    """Running mean and std of every value seen so far (parallel merge of batch moments, as TRL).

    With n, μ, σ² (biased) so far and a batch of m values with mean μ_b, variance σ_b² (biased):
      δ = μ_b - μ;  N = n + m;  μ <- μ + δ·m/N;  σ² <- (n·σ² + m·σ_b² + δ²·n·m/N) / N
      std = sqrt(σ² · N/(N-1))      (unbiased, as TRL reports it)
    Before any update mean = 0 and std = 1, so normalize_scores is the identity.
    """

    def __init__(self):
        self.mean = 0.0
        self.var = 0.0
        self.std = 1.0
        self.count = 0

    @torch.no_grad()
    def update(self, x):
        """Merge the values of x (any shape) into the running moments; returns (batch_mean,
        batch_std)."""
        x = x.detach().double().flatten()
        m = x.numel()
        if m < 2:
            raise ValueError(
                f"RunningMoments.update needs at least 2 values to estimate a std, got {m}"
            )
        batch_var, batch_mean = torch.var_mean(x, unbiased=False)
        batch_mean = batch_mean.item()
        batch_var = batch_var.item()
        delta = batch_mean - self.mean
        n = self.count
        total = n + m
        self.mean += delta * m / total
        self.var = (n * self.var + m * batch_var + delta**2 * n * m / total) / total
        self.std = math.sqrt(self.var * total / (total - 1))
        self.count = total
        return batch_mean, math.sqrt(batch_var * m / (m - 1))

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state):
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.std = float(state["std"])
        self.count = int(state["count"])


def normalize_scores(scores, moments, eps=1e-8):
    """s = (r - running_mean) / (running_std + eps). Call moments.update(scores) first (as TRL)."""
    return (scores - moments.mean) / (moments.std + eps)


def per_token_kl(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1"):
    """Per-token KL estimate at the sampled tokens a_t ~ π, clamped to [kl_min, kl_max], and 0 on
    padding, (B, T):

      k1:  KL_t = log π(a_t) - log π_ref(a_t)               (TRL's "kl"; unbiased, either sign)
      k3:  KL_t = (ρ_t - 1) - log ρ_t,  ρ_t = π_ref(a_t) / π(a_t)   (unbiased and >= 0 per token)

    Both average to KL(π || π_ref) under samples from π. k1 clamped at 0 is biased upwards to first
    order in the policy change (E[max(k1, 0)] ~ E|k1| / 2): a cost per token even where KL ~ 0, i.e.
    a push to shorter replies. k3 is non-negative per token and second order, so its clamp only
    bounds the top. None disables a side of the clamp. Differentiable in logprobs (GRPO's loss); the
    inputs are left unchanged.
    """
    log_ratio = logprobs - ref_logprobs  # log π - log π_ref
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio  # (ρ - 1) - log ρ
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")
    if kl_min is not None or kl_max is not None:
        kl = kl.clamp(min=kl_min, max=kl_max)
    return kl * mask.to(kl.dtype)


def kl_penalized_rewards(
    scores, logprobs, ref_logprobs, mask, kl_coef, kl_min=0.0, kl_max=10.0, estimator="k1"
):
    """r_t = -β·KL_t + s·[t = last real token of the row], (B, T); padding gets 0.

    scores (B,) are the (normalised) sequence scores; rows with no real token get nothing; inputs
    left unchanged.
    """
    kl = per_token_kl(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)  # (B, T)
    rewards = -kl_coef * kl  # -β·KL_t
    mask = mask.to(kl.dtype)
    T = mask.shape[1]
    # 1-based so pads (0) never win
    positions = torch.arange(1, T + 1, device=mask.device, dtype=kl.dtype)
    last = (mask * positions).argmax(dim=1)  # (B,) last real index
    has_token = mask.sum(dim=1) > 0  # (B,)
    is_last = (torch.arange(T, device=mask.device) == last[:, None]) & has_token[:, None]  # (B, T)
    # score on the last token
    return rewards + scores[:, None].to(kl.dtype) * is_last


# ----------------------------------------------------------------------------- 3. GAE


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over the reply tokens, (advantages, returns) each (B, T).

      δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t
      A_t = (δ_t + γλ·A_{t+1}) · m_t          (A_T = 0; equals Σ_l (γλ)^l δ_{t+l} on a prefix mask)
      R_t = (A_t + V_t) · m_t
    No whitening here: whiten rewards before and advantages after, in the caller. The inputs are
    left unchanged.
    """
    mask = mask.to(values.dtype)
    # nothing from beyond EOS enters δ
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # δ_t
        last_advantage = (delta + gamma * lam * last_advantage) * mask[:, t]  # A_t
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask  # R_t
    return advantages, returns


def groups(rewards, k, name):
    """rewards (N,) as (N/k, k): k consecutive replies per context, as RLOO and GRPO sample them."""
    if k < 2:
        raise ValueError(
            f"{name} needs k >= 2 replies per context (got {k}): with one there is no baseline"
        )
    if rewards.numel() % k:
        raise ValueError(f"{name}: {rewards.numel()} rewards are not groups of k = {k}")
    return rewards.view(-1, k)  # (N/k, k)


def rloo_advantages(rewards, k):
    """RLOO (Ahmadian et al. 2024) in place of GAE: each reply's sequence reward minus the mean
    reward of the other k - 1 replies to the same context, A_i = r_i - 1/(k-1) Σ_{j≠i} r_j. A
    baseline from the same context's samples, no value head. rewards (N,) hold k consecutive replies
    per context -> (N,), left unchanged."""
    r = groups(rewards, k, "rloo_advantages")  # (N/k, k)
    # r_i - mean of the others
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def grpo_advantages(rewards, k, eps=1e-4):
    """GRPO (Shao et al. 2024, DeepSeekMath): each reply's reward standardised within the k replies
    to its context, A_i = (r_i - mean_j r_j) / (std_j r_j + ε): the group's std with k - 1 (as TRL's
    GRPOTrainer), ε added to it (not under the root), the reply itself in both. No value head; the
    KL goes into the loss. (N,) -> (N,), rewards kept."""
    r = groups(rewards, k, "grpo_advantages")  # (N/k, k)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


# ----------------------------------------------------------------------------- 4. losses


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """Clipped surrogate: ρ_t = exp(log π - log π_old), L_pg = mean_m(max(-A·ρ, -A·clip(ρ, 1-c,
    1+c))), with ρ differentiable in both terms (d/dlog π: -A·ρ/n where the unclipped term is
    larger, else 0); inputs unchanged.

    stats (detached 0-dim tensors): ratio = mean_m(ρ); clipfrac = mean_m([-A·clip(ρ) > -A·ρ]);
    approx_kl = ½·mean_m((log π - log π_old)²); approx_kl_k3 = mean_m((ρ - 1) - log ρ).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)  # ρ_t
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)  # L_pg
    with torch.no_grad():
        stats = {
            "ratio": masked_mean(ratio, mask),
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "approx_kl_k3": masked_mean((ratio - 1) - log_ratio, mask),
        }
    return pg_loss, stats


def value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    """Clipped value loss: V^clip = clip(V, V_old - c, V_old + c), L_v = ½·mean_m(max((V - R)²,
    (V^clip - R)²)), V differentiable in both terms; stats (detached) vf_clipfrac =
    mean_m([(V^clip-R)² > (V-R)²]); inputs unchanged.
    """
    # V^clip
    values_clipped = torch.clamp(
        values, old_values - clip_range_value, old_values + clip_range_value
    )
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)  # L_v
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)}
    return vf_loss, stats


# ----------------------------------------------------------------------------- 5. statistics


def entropy_from_logits(logits):
    """H = -Σ_v p_v log p_v for logits z (B, T, V) -> (B, T). A token masked with z = -inf (</s>
    before the minimum length) has p = 0 and adds 0 (entr(0) = 0; the form logsumexp(z) - Σ p·z
    would give nan there)."""
    return torch.special.entr(torch.softmax(logits, dim=-1)).sum(dim=-1)


def explained_variance(values, returns, mask):
    """EV = 1 - var_m(R - V) / var_m(R), a float: 1 for perfect values, 0 for predicting the mean.

    nan when the returns have zero variance (as cleanrl).
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask, unbiased=False) / var_returns).item()


class KLController:
    """β of the KL penalty: fixed, or adaptive (Ziegler et al. 2019): after a step with mean summed
    KL and n_steps rollouts, β <- β · (1 + clip(KL/target - 1, -0.2, 0.2) · n_steps / horizon)."""

    def __init__(self, init_kl_coef=0.2, target=6.0, horizon=10000, adaptive=True):
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon
        self.adaptive = adaptive

    def update(self, current_kl, n_steps):
        if self.adaptive:
            proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
            self.value *= 1 + proportional_error * n_steps / self.horizon  # β update

    def state_dict(self):  # β is the only state; target and horizon are settings
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])
