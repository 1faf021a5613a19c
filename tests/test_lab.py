"""lab/lab.py, the course grader: student copies, the checks of each exercise, the PPO run,
check-run.

The lab checks themselves (lab/checks/) are tested here against implementations a student might
write: correct ones written with Python loops must pass, and the usual mistakes must fail, each on
the check that names it."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import ppo
import reward

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ROOT / "lab" / "checks"
# the checks import their helpers (checklib) by name, as under pytest
sys.path.insert(0, str(CHECKS))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lab = load(ROOT / "lab" / "lab.py", "lab_grader")
checklib = load(CHECKS / "checklib.py", "lab_checklib")


# ---------------------------------------------------------------------------- what a student writes

# Correct implementations written the slow, obvious way (Python loops over rows and tokens), nothing
# like the reference's tensor code: the checks must accept them. A mask may be 0/1 (int, bool or
# float) or, where a function averages over it (policy_loss, value_loss), non-negative weights.
LOOPS = {
    "ppo.gae": '''
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE row by row, from the last real token backwards."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())  # real tokens 0 .. n-1
        next_advantage, next_value = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = next_advantage
            returns[b, t] = next_advantage + values[b, t]
            next_value = values[b, t]
    return advantages, returns
''',
    "ppo.rloo_advantages": '''
def rloo_advantages(rewards, k):
    """Each reply minus the mean of the other replies of its group."""
    advantages = torch.zeros_like(rewards)
    for start in range(0, len(rewards), k):
        group = rewards[start:start + k]
        for i in range(k):
            others = group.sum() - group[i]
            advantages[start + i] = group[i] - others / (k - 1)
    return advantages
''',
    "ppo.per_token_kl": '''
def per_token_kl(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1"):
    """Token by token."""
    kl = torch.zeros_like(logprobs)
    for b in range(logprobs.shape[0]):
        for t in range(logprobs.shape[1]):
            if mask[b, t]:
                d = logprobs[b, t] - ref_logprobs[b, t]
                if estimator == "k1":
                    x = d
                else:
                    x = torch.exp(-d) - 1 + d
                if kl_min is not None or kl_max is not None:
                    x = torch.clamp(x, min=kl_min, max=kl_max)
                kl[b, t] = x
    return kl
''',
    "ppo.kl_penalized_rewards": '''
def kl_penalized_rewards(
    scores, logprobs, ref_logprobs, mask, kl_coef, kl_min=0.0, kl_max=10.0, estimator="k1"
):
    """The penalty everywhere, then the score on each row's last real token."""
    rewards = -kl_coef * per_token_kl(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
    for b in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[b, t]]
        if real:
            rewards[b, real[-1]] += scores[b]
    return rewards
''',
    "ppo.policy_loss": '''
def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """Token by token, then means weighted by the mask."""
    losses, ratios, clipped, kl, kl3, weights = [], [], [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            w = mask[b, t]
            if w:
                log_ratio = logprobs[b, t] - old_logprobs[b, t]
                ratio = torch.exp(log_ratio)
                unclipped = -advantages[b, t] * ratio
                clip = -advantages[b, t] * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                losses.append(torch.maximum(unclipped, clip))
                ratios.append(ratio.detach())
                clipped.append((clip > unclipped).to(ratio.dtype).detach())
                kl.append(0.5 * log_ratio.detach() ** 2)
                kl3.append((ratio - 1 - log_ratio).detach())
                weights.append(w.to(ratio.dtype))
    w = torch.stack(weights)
    mean = lambda xs: (torch.stack(xs) * w).sum() / w.sum()
    return mean(losses), {"ratio": mean(ratios), "clipfrac": mean(clipped), "approx_kl": mean(kl),
                          "approx_kl_k3": mean(kl3)}
''',
    "ppo.value_loss": '''
def value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    """Token by token, then means weighted by the mask."""
    losses, clipped, weights = [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            w = mask[b, t]
            if w:
                v_clip = torch.clamp(values[b, t], old_values[b, t] - clip_range_value,
                                     old_values[b, t] + clip_range_value)
                error = (values[b, t] - returns[b, t]) ** 2
                error_clip = (v_clip - returns[b, t]) ** 2
                losses.append(torch.maximum(error, error_clip))
                clipped.append((error_clip > error).to(values.dtype).detach())
                weights.append(w.to(values.dtype))
    w = torch.stack(weights)
    mean = lambda xs: (torch.stack(xs) * w).sum() / w.sum()
    return 0.5 * mean(losses), {"vf_clipfrac": mean(clipped)}
''',
    "ppo.grpo_advantages": '''
def grpo_advantages(rewards, k, eps=1e-4):
    """Each group standardised: mean and unbiased std over its k replies."""
    advantages = torch.zeros_like(rewards)
    for start in range(0, len(rewards), k):
        group = [rewards[i].item() for i in range(start, start + k)]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        for i, x in enumerate(group):
            advantages[start + i] = (x - mean) / (std + eps)
    return advantages
''',
    "reward.reward_from_logits": '''
def reward_from_logits(logits, targets):
    """Reply by reply, mechanism by mechanism."""
    rewards = []
    for b in range(logits.shape[0]):
        probs = []
        for k in range(logits.shape[1]):
            e = torch.exp(logits[b, k].float())
            probs.append(e[targets[b, k]] / e.sum())
        rewards.append(torch.stack(probs).prod())
    return torch.stack(rewards)
''',
}

# Correct implementations written a third way (tensor code, but not the reference's: a matrix for
# GAE, log-softmax for the reward, std_mean for GRPO, torch.where for the masks, ...). With LOOPS
# and the repository's own functions: three per exercise.
VECTOR = {
    "ppo.gae": """
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    \"\"\"A = δ @ W with W[s, t] = (γλ)^(s - t) for s >= t.\"\"\"
    m = mask.to(rewards.dtype)
    v = values * m
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    delta = (rewards + gamma * next_v - v) * m
    s = torch.arange(rewards.shape[1])[:, None]
    t = torch.arange(rewards.shape[1])[None, :]
    W = (gamma * lam) ** (s - t).clamp(min=0).to(rewards.dtype) * (s >= t)
    advantages = (delta @ W) * m
    return advantages, (advantages + v) * m
""",
    "ppo.rloo_advantages": """
def rloo_advantages(rewards, k):
    \"\"\"r_i - mean of the others = k/(k-1) · (r_i - mean of all).\"\"\"
    r = rewards.reshape(-1, k)
    return (k / (k - 1) * (r - r.mean(dim=1, keepdim=True))).reshape(-1)
""",
    "ppo.grpo_advantages": """
def grpo_advantages(rewards, k, eps=1e-4):
    \"\"\"std_mean with Bessel's correction per group.\"\"\"
    r = rewards.reshape(-1, k)
    std, mean = torch.std_mean(r, dim=1, keepdim=True, correction=1)
    return ((r - mean) / (std + eps)).reshape(-1)
""",
    "ppo.per_token_kl": """
def per_token_kl(logprobs, ref_logprobs, mask, kl_min=0.0, kl_max=10.0, estimator="k1"):
    \"\"\"k3 from the reversed log-ratio; padding by torch.where.\"\"\"
    reverse = ref_logprobs - logprobs
    kl = -reverse if estimator == "k1" else torch.exp(reverse) - 1 - reverse
    if kl_min is not None:
        kl = torch.maximum(kl, torch.full_like(kl, kl_min))
    if kl_max is not None:
        kl = torch.minimum(kl, torch.full_like(kl, kl_max))
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))
""",
    "ppo.kl_penalized_rewards": """
def kl_penalized_rewards(
    scores, logprobs, ref_logprobs, mask, kl_coef, kl_min=0.0, kl_max=10.0, estimator="k1"
):
    \"\"\"The score put on index (length - 1) of every row that has a token.\"\"\"
    rewards = -kl_coef * per_token_kl(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)
    lengths = mask.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0).flatten()
    rewards = rewards.clone()
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards
""",
    "ppo.policy_loss": """
def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    \"\"\"-min(A·ρ, A·clip(ρ)); padding by torch.where, means weighted by the mask.\"\"\"
    real, w = mask != 0, mask.to(logprobs.dtype)
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    a = torch.where(real, advantages, torch.zeros_like(advantages))
    gain, gain_clipped = a * ratio, a * ratio.clamp(1 - clip_range, 1 + clip_range)
    mean = lambda x: (x * w).sum() / w.sum()
    loss = -mean(torch.minimum(gain, gain_clipped))
    r, lr = ratio.detach(), log_ratio.detach()
    stats = {"ratio": mean(r), "clipfrac": mean((gain_clipped < gain).to(r.dtype)),
             "approx_kl": mean(lr * lr) / 2, "approx_kl_k3": mean(r - 1 - lr)}
    return loss, stats
""",
    "ppo.value_loss": """
def value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    \"\"\"V^clip as V_old plus the clamped step; padding by torch.where, means weighted.\"\"\"
    w = mask.to(values.dtype)
    v_clip = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    error, error_clip = (values - returns).square(), (v_clip - returns).square()
    worst = torch.where(mask != 0, torch.maximum(error, error_clip), torch.zeros_like(error))
    with torch.no_grad():
        clipfrac = ((error_clip > error).to(values.dtype) * w).sum() / w.sum()
    return (worst * w).sum() / w.sum() / 2, {"vf_clipfrac": clipfrac}
""",
    "reward.reward_from_logits": """
def reward_from_logits(logits, targets):
    \"\"\"exp of the summed log-softmax at the targets (in float64), returned in float32.\"\"\"
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return log_p.gather(-1, targets.long()[..., None])[..., 0].sum(dim=-1).exp().float()
""",
}

# policy_loss as a student might write it with x[mask.bool()]: right for a 0/1 mask, wrong for
# GRPO's per-reply weights (a plain mean over the tokens whose weight is not 0).
MASK_SELECT_POLICY_LOSS = """
def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    \"\"\"-min(A·ρ, A·clip(ρ)) averaged with masked_select.\"\"\"
    real = mask.bool()
    log_ratio = (logprobs - old_logprobs).masked_select(real)
    ratio = log_ratio.exp()
    a = advantages.masked_select(real)
    gain, gain_clipped = a * ratio, a * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = -torch.minimum(gain, gain_clipped).mean()
    r, lr = ratio.detach(), log_ratio.detach()
    stats = {"ratio": r.mean(), "clipfrac": (gain_clipped < gain).detach().to(r.dtype).mean(),
             "approx_kl": (lr * lr).mean() / 2, "approx_kl_k3": (r - 1 - lr).mean()}
    return loss, stats
"""


class Mutant(NamedTuple):
    """A planted mistake: `wrong` in place of `correct` in the LOOPS version of the exercise (or the
    VECTOR one, base="vector"; base="source": `wrong` is the whole function). `check` must be the
    first check to fail, and its message must name the cause `cause` (a key of CAUSES of the check
    file or of checklib), or no cause at all (None)."""

    exercise: str
    mistake: str
    check: str
    cause: str | None
    correct: str
    wrong: str
    base: str = "loops"


# The usual mistakes, each a small change of the loop version above, and the mistakes that only
# training's conditions show (float32 aliases, int64 masks, other sizes, far ratios, weights).
MUTANTS = [
    # --- ppo.gae
    Mutant(
        "ppo.gae",
        "λ ignored (λ = 1)",
        "test_gae_uses_lambda",
        "lambda",
        "delta + gamma * lam * next_advantage",
        "delta + gamma * next_advantage",
    ),
    Mutant(
        "ppo.gae",
        "bootstraps from the value after </s>",
        "test_gae_does_not_bootstrap_past_eos",
        "bootstrap",
        "next_advantage, next_value = 0.0, 0.0",
        "next_advantage = 0.0\n        next_value = values[b, n] if n < values.shape[1] else 0.0",
    ),
    Mutant(
        "ppo.gae",
        "λ also on the TD error itself (A_t = λ·δ_t + γλ·A_{t+1})",
        "test_gae_does_not_bootstrap_past_eos",
        None,
        "next_advantage = delta + gamma * lam * next_advantage",
        "next_advantage = lam * delta + gamma * lam * next_advantage",
    ),
    Mutant(
        "ppo.gae",
        "the time index runs forwards (V_{t-1} for V_{t+1})",
        "test_gae_does_not_bootstrap_past_eos",
        None,
        "for t in reversed(range(n)):",
        "for t in range(n):",
    ),
    Mutant(
        "ppo.gae",
        "zeroes the padding of the caller's values in place",
        "test_gae_leaves_its_inputs_unchanged",
        "in_place",
        "    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "    values *= mask\n"
        "    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
    ),
    Mutant(
        "ppo.gae",
        "masks the values in place through values.float() (the caller's own tensor in float32)",
        "test_gae_leaves_its_inputs_unchanged",
        "alias",
        "    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "    values = values.float()\n"
        "    values *= mask\n"
        "    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
    ),
    Mutant(
        "ppo.gae",
        "γ left out of δ",
        "test_gae_uses_gamma",
        "gamma",
        "delta = rewards[b, t] + gamma * next_value - values[b, t]",
        "delta = rewards[b, t] + next_value - values[b, t]",
    ),
    Mutant(
        "ppo.gae",
        "returns without the values",
        "test_gae_returns_are_advantages_plus_values",
        "returns",
        "returns[b, t] = next_advantage + values[b, t]",
        "returns[b, t] = next_advantage",
    ),
    Mutant(
        "ppo.gae",
        "returns with the values after </s>",
        "test_gae_puts_nothing_after_eos",
        None,
        "advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "advantages, returns = torch.zeros_like(rewards), values.clone()",
    ),
    Mutant(
        "ppo.gae",
        "returns only the advantages",
        "test_gae_returns_advantages_and_returns_of_shape_b_t",
        None,
        "    return advantages, returns",
        "    return advantages",
    ),
    Mutant(
        "ppo.gae",
        "outputs made with torch.zeros_like(mask) (integers with an int64 mask)",
        "test_gae_in_float32_and_bfloat16_with_integer_and_bool_masks",
        "mask_dtype",
        "advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "advantages, returns = torch.zeros_like(mask), torch.zeros_like(mask)",
    ),
    Mutant(
        "ppo.gae",
        "outputs of 7 tokens",
        "test_gae_works_for_any_batch_size_and_reply_length",
        "size",
        "advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "advantages = torch.zeros(len(rewards), 7, dtype=rewards.dtype)\n"
        "    returns = torch.zeros(len(rewards), 7, dtype=rewards.dtype)",
    ),
    # --- ppo.rloo_advantages
    Mutant(
        "ppo.rloo_advantages",
        "baseline is the mean of the group, the reply included",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        "all",
        "group[i] - others / (k - 1)",
        "group[i] - group.mean()",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "baseline divided by k, not k - 1",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        "k",
        "group[i] - others / (k - 1)",
        "group[i] - others / k",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "scaled by (k - 1)/k instead of k/(k - 1)",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        None,
        "group[i] - others / (k - 1)",
        "(group[i] - group.mean()) * (k - 1) / k",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "the others' mean scaled by k/(k - 1) once more",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        None,
        "group[i] - others / (k - 1)",
        "group[i] - others * k / (k - 1) ** 2",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "groups strided instead of consecutive",
        "test_rloo_groups_are_k_consecutive_replies",
        "strided",
        "group = rewards[start:start + k]",
        "group = rewards[start // k::len(rewards) // k]",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "shifts the caller's rewards in place",
        "test_rloo_leaves_its_inputs_unchanged",
        "in_place",
        "    advantages = torch.zeros_like(rewards)",
        "    rewards -= rewards.mean()\n    advantages = torch.zeros_like(rewards)",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "one advantage per context",
        "test_rloo_gives_one_advantage_per_reply",
        None,
        "    return advantages",
        "    return advantages.view(-1, k).mean(1)",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "20 rewards written in",
        "test_rloo_works_for_any_number_of_replies",
        "size",
        "for start in range(0, len(rewards), k):",
        "for start in range(0, 20, k):",
    ),
    Mutant(
        "ppo.rloo_advantages",
        "advantages in float64 whatever the rewards' dtype",
        "test_rloo_in_float32_and_bfloat16",
        None,
        "    advantages = torch.zeros_like(rewards)",
        "    advantages = torch.zeros_like(rewards, dtype=torch.float64)",
    ),
    # --- ppo.grpo_advantages
    Mutant(
        "ppo.grpo_advantages",
        "the biased std (over k, not k - 1)",
        "test_grpo_advantages_are_the_rewards_centred_and_scaled_per_context",
        "biased",
        "/ (k - 1))",
        "/ k)",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "no ε (0 / 0 for equal rewards)",
        "test_equal_rewards_give_zero_advantages_not_nan",
        None,
        "(std + eps)",
        "std",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "ε under the square root, sqrt(var + ε)",
        "test_epsilon_is_added_to_the_std_not_under_the_root",
        "under_root",
        "(x - mean) / (std + eps)",
        "(x - mean) / math.sqrt(std ** 2 + eps)",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "the eps argument ignored (1e-4 written in)",
        "test_grpo_uses_the_eps_it_is_given",
        "eps_ignored",
        "(x - mean) / (std + eps)",
        "(x - mean) / (std + 1e-4)",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "one std over the whole batch",
        "test_grpo_std_is_the_groups_not_the_batchs",
        "batch_std",
        "std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))",
        "std = rewards.std().item()",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "shifts the caller's rewards in place",
        "test_grpo_leaves_its_inputs_unchanged",
        "in_place",
        "    advantages = torch.zeros_like(rewards)",
        "    rewards -= rewards.mean()\n    advantages = torch.zeros_like(rewards)",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "one advantage per context",
        "test_grpo_gives_one_advantage_per_reply",
        None,
        "    return advantages",
        "    return advantages.view(-1, k).mean(1)",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "20 rewards written in",
        "test_grpo_works_for_any_number_of_replies",
        "size",
        "for start in range(0, len(rewards), k):",
        "for start in range(0, 20, k):",
    ),
    Mutant(
        "ppo.grpo_advantages",
        "advantages in float64 whatever the rewards' dtype",
        "test_grpo_in_float32_and_bfloat16",
        None,
        "    advantages = torch.zeros_like(rewards)",
        "    advantages = torch.zeros_like(rewards, dtype=torch.float64)",
    ),
    # --- ppo.per_token_kl
    Mutant(
        "ppo.per_token_kl",
        "wrong sign",
        "test_kl_is_log_pi_minus_log_pi_ref",
        "sign",
        "d = logprobs[b, t] - ref_logprobs[b, t]",
        "d = ref_logprobs[b, t] - logprobs[b, t]",
    ),
    Mutant(
        "ppo.per_token_kl",
        "unclamped",
        "test_kl_is_clamped_to_0_10_by_default",
        "unclamped",
        "x = torch.clamp(x, min=kl_min, max=kl_max)",
        "pass",
    ),
    Mutant(
        "ppo.per_token_kl",
        "not masked",
        "test_kl_is_0_after_eos",
        None,
        "if mask[b, t]:",
        "if True:",
    ),
    Mutant(
        "ppo.per_token_kl",
        "no gradient (computed on detached log-probs)",
        "test_kl_gradient_flows_to_the_policy_log_probs",
        "no_gradient",
        "d = logprobs[b, t] - ref_logprobs[b, t]",
        "d = (logprobs[b, t] - ref_logprobs[b, t]).detach()",
    ),
    Mutant(
        "ppo.per_token_kl",
        "zeroes the padding of the caller's log-probs in place",
        "test_per_token_kl_leaves_its_inputs_unchanged",
        "in_place",
        "    kl = torch.zeros_like(logprobs)",
        "    logprobs[mask == 0] = 0\n    kl = torch.zeros_like(logprobs)",
    ),
    Mutant(
        "ppo.per_token_kl",
        "the log-ratio computed in place on logprobs.float() (the caller's own tensor in float32)",
        "test_per_token_kl_leaves_its_inputs_unchanged",
        "alias",
        "    kl = torch.zeros_like(logprobs)\n"
        "    for b in range(logprobs.shape[0]):\n"
        "        for t in range(logprobs.shape[1]):\n"
        "            if mask[b, t]:\n"
        "                d = logprobs[b, t] - ref_logprobs[b, t]",
        "    log_ratio = logprobs.float()\n"
        "    log_ratio -= ref_logprobs.float()\n"
        "    kl = torch.zeros_like(logprobs)\n"
        "    for b in range(logprobs.shape[0]):\n"
        "        for t in range(logprobs.shape[1]):\n"
        "            if mask[b, t]:\n"
        "                d = log_ratio[b, t]",
    ),
    Mutant(
        "ppo.per_token_kl",
        "k3 with the ratio inverted",
        "test_k3_estimator",
        "k3_inverted",
        "x = torch.exp(-d) - 1 + d",
        "x = torch.exp(d) - 1 - d",
    ),
    Mutant(
        "ppo.per_token_kl",
        "clamp to [0, 10] whatever kl_min and kl_max say",
        "test_kl_clamp_follows_kl_min_and_kl_max",
        "fixed_clamp",
        "x = torch.clamp(x, min=kl_min, max=kl_max)",
        "x = torch.clamp(x, min=0.0, max=10.0)",
    ),
    Mutant(
        "ppo.per_token_kl",
        "7 tokens written in",
        "test_per_token_kl_works_for_any_batch_size_and_reply_length",
        "size",
        "for t in range(logprobs.shape[1]):",
        "for t in range(7):",
    ),
    Mutant(
        "ppo.per_token_kl",
        "the KL made with torch.zeros_like(mask) (integers with an int64 mask)",
        "test_per_token_kl_in_float32_and_bfloat16_with_integer_and_bool_masks",
        "mask_dtype",
        "    kl = torch.zeros_like(logprobs)",
        "    kl = torch.zeros_like(mask)",
    ),
    # --- ppo.kl_penalized_rewards
    Mutant(
        "ppo.kl_penalized_rewards",
        "score on the last column, not the last real token",
        "test_score_lands_on_the_last_real_token",
        "last_column",
        "rewards[b, real[-1]] += scores[b]",
        "rewards[b, -1] += scores[b]",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "the score also after </s>",
        "test_score_lands_on_the_last_real_token",
        "after_eos",
        "            rewards[b, real[-1]] += scores[b]",
        "            rewards[b, real[-1]:] += scores[b]",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "zeroes the padding of the caller's log-probs in place",
        "test_kl_penalized_rewards_leave_their_inputs_unchanged",
        "in_place",
        "    rewards = -kl_coef * per_token_kl(",
        "    logprobs.mul_(mask)\n    rewards = -kl_coef * per_token_kl(",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "the penalty's sign flipped",
        "test_every_real_token_pays_beta_times_kl",
        "sign",
        "rewards = -kl_coef * per_token_kl(",
        "rewards = kl_coef * per_token_kl(",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "the KL settings not passed on",
        "test_the_kl_settings_are_passed_on",
        "settings",
        "per_token_kl(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)",
        "per_token_kl(logprobs, ref_logprobs, mask)",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "the penalty also after </s>",
        "test_rewards_are_0_after_eos",
        None,
        "per_token_kl(logprobs, ref_logprobs, mask, kl_min,",
        "per_token_kl(logprobs, ref_logprobs, mask * 0 + 1, kl_min,",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "7 tokens written in",
        "test_kl_penalized_rewards_work_for_any_batch_size_and_reply_length",
        "size",
        "real = [t for t in range(mask.shape[1]) if mask[b, t]]",
        "real = [t for t in range(7) if mask[b, t]]",
    ),
    Mutant(
        "ppo.kl_penalized_rewards",
        "the rewards copied into torch.zeros_like(mask) (integers with an int64 mask)",
        "test_kl_penalized_rewards_in_float32_and_bfloat16_with_integer_and_bool_masks",
        "mask_dtype",
        "    rewards = rewards.clone()",
        "    buffer = torch.zeros_like(mask)\n    buffer[:] = rewards\n    rewards = buffer",
        "vector",
    ),
    # --- ppo.policy_loss
    Mutant(
        "ppo.policy_loss",
        "ratio inverted (π_old / π)",
        "test_ratio_is_against_the_rollout_policy_not_the_reference_model",
        "inverted",
        "log_ratio = logprobs[b, t] - old_logprobs[b, t]",
        "log_ratio = old_logprobs[b, t] - logprobs[b, t]",
    ),
    Mutant(
        "ppo.policy_loss",
        "ratio against the current policy itself (always 1)",
        "test_ratio_is_against_the_rollout_policy_not_the_reference_model",
        None,
        "log_ratio = logprobs[b, t] - old_logprobs[b, t]",
        "log_ratio = logprobs[b, t] - logprobs[b, t].detach()",
    ),
    Mutant(
        "ppo.policy_loss",
        "optimistic clip (min instead of max)",
        "test_clipping_is_pessimistic",
        "optimistic",
        "torch.maximum(unclipped, clip)",
        "torch.minimum(unclipped, clip)",
    ),
    Mutant(
        "ppo.policy_loss",
        "dual-clip PPO (the loss of A < 0 capped at -3A)",
        "test_ratios_far_outside_the_clip_range",
        "dual_clip",
        "losses.append(torch.maximum(unclipped, clip))",
        "losses.append(torch.maximum(unclipped, clip) if advantages[b, t] >= 0 else\n"
        "                              torch.minimum(torch.maximum(unclipped, clip),\n"
        "                                            -3 * advantages[b, t]))",
    ),
    Mutant(
        "ppo.policy_loss",
        "a mean over the padding too",
        "test_padding_is_ignored",
        None,
        "            w = mask[b, t]\n            if w:",
        "            w = torch.ones_like(mask[b, t])\n            if w:",
    ),
    Mutant(
        "ppo.policy_loss",
        "per-reply weights read as 0/1",
        "test_the_mask_may_be_grpo_per_reply_weights",
        "weights",
        "weights.append(w.to(ratio.dtype))",
        "weights.append((w != 0).to(ratio.dtype))",
    ),
    Mutant(
        "ppo.policy_loss",
        "a mean over x[mask.bool()] (per-reply weights read as 0/1)",
        "test_the_mask_may_be_grpo_per_reply_weights",
        "weights",
        "",
        MASK_SELECT_POLICY_LOSS,
        "source",
    ),
    Mutant(
        "ppo.policy_loss",
        "unclipped term detached (same value, gradient halved at ρ = 1)",
        "test_gradient_at_ratio_1_is_minus_the_advantage",
        "half_gradient",
        "unclipped = -advantages[b, t] * ratio",
        "unclipped = -advantages[b, t] * ratio.detach()",
    ),
    Mutant(
        "ppo.policy_loss",
        "clipped term detached",
        "test_gradient_at_ratio_1_is_minus_the_advantage",
        "half_gradient",
        "clip = -advantages[b, t] * torch.clamp(ratio,",
        "clip = -advantages[b, t] * torch.clamp(ratio.detach(),",
    ),
    Mutant(
        "ppo.policy_loss",
        "statistics still attached to the graph",
        "test_statistics_are_detached",
        "detached_stats",
        "ratios.append(ratio.detach())",
        "ratios.append(ratio)",
    ),
    Mutant(
        "ppo.policy_loss",
        "approx_kl without the ½",
        "test_approx_kl_is_half_the_mean_squared_log_ratio",
        "half",
        "kl.append(0.5 * log_ratio.detach() ** 2)",
        "kl.append(log_ratio.detach() ** 2)",
    ),
    Mutant(
        "ppo.policy_loss",
        "zeroes the padding of the caller's advantages in place",
        "test_policy_loss_leaves_its_inputs_unchanged",
        "in_place",
        "    losses, ratios, clipped, kl, kl3, weights = [], [], [], [], [], []",
        "    advantages *= mask\n"
        "    losses, ratios, clipped, kl, kl3, weights = [], [], [], [], [], []",
    ),
    Mutant(
        "ppo.policy_loss",
        "unclipped term detached outside the clip range",
        "test_gradient_on_the_clipped_and_unclipped_sides",
        "unclipped_side",
        "unclipped = -advantages[b, t] * ratio",
        "unclipped = -advantages[b, t] * (ratio if 1 - clip_range <= ratio <= 1 + clip_range else "
        "ratio.detach())",
    ),
    Mutant(
        "ppo.policy_loss",
        "ρ = exp(log π_old - log π) only in the statistics",
        "test_ratio_is_1_before_the_first_update",
        None,
        "ratios.append(ratio.detach())",
        "ratios.append(ratio.detach() + 1)",
    ),
    Mutant(
        "ppo.policy_loss",
        "clipped tokens still pushed",
        "test_clipped_tokens_get_no_gradient",
        None,
        "losses.append(torch.maximum(unclipped, clip))",
        "losses.append(torch.maximum(unclipped, clip.detach() + unclipped - unclipped.detach()))",
    ),
    Mutant(
        "ppo.policy_loss",
        "returns a per-token loss",
        "test_policy_loss_returns_a_scalar_loss_and_its_statistics",
        None,
        "    return mean(losses), {",
        "    return torch.stack(losses), {",
    ),
    Mutant(
        "ppo.policy_loss",
        "5 rows written in",
        "test_policy_loss_works_for_any_batch_size_and_reply_length",
        "size",
        "for b in range(mask.shape[0]):",
        "for b in range(5):",
    ),
    Mutant(
        "ppo.policy_loss",
        "means in float64 whatever the inputs' dtype",
        "test_policy_loss_in_float32_and_bfloat16_with_integer_and_bool_masks",
        None,
        "weights.append(w.to(ratio.dtype))",
        "weights.append(w.double())",
    ),
    # --- ppo.value_loss
    Mutant(
        "ppo.value_loss",
        "no clip",
        "test_value_loss_clips_the_value_update",
        "no_clip",
        "torch.maximum(error, error_clip)",
        "error",
    ),
    Mutant(
        "ppo.value_loss",
        "min of the two errors, not max",
        "test_value_loss_clips_the_value_update",
        "min",
        "torch.maximum(error, error_clip)",
        "torch.minimum(error, error_clip)",
    ),
    Mutant(
        "ppo.value_loss",
        "always the clipped error",
        "test_value_loss_clips_the_value_update",
        "clipped_only",
        "torch.maximum(error, error_clip)",
        "error_clip",
    ),
    Mutant(
        "ppo.value_loss",
        "no ½",
        "test_value_loss_is_half_the_mean_squared_error_inside_the_clip_range",
        "half",
        "return 0.5 * mean(losses)",
        "return mean(losses)",
    ),
    Mutant(
        "ppo.value_loss",
        "a mean over the padding too",
        "test_padding_is_ignored",
        None,
        "            w = mask[b, t]\n            if w:",
        "            w = torch.ones_like(mask[b, t])\n            if w:",
    ),
    Mutant(
        "ppo.value_loss",
        "computed on values.detach() (the value head never learns)",
        "test_the_value_head_gets_the_gradient_of_the_definition",
        "no_gradient",
        "    losses, clipped, weights = [], [], []",
        "    values = values.detach()\n    losses, clipped, weights = [], [], []",
    ),
    Mutant(
        "ppo.value_loss",
        "statistics still attached to the graph",
        "test_statistics_are_detached",
        "detached_stats",
        '{"vf_clipfrac": mean(clipped)}',
        '{"vf_clipfrac": mean(clipped) + 0 * values.sum()}',
    ),
    Mutant(
        "ppo.value_loss",
        "zeroes the padding of the caller's returns in place",
        "test_value_loss_leaves_its_inputs_unchanged",
        "in_place",
        "    losses, clipped, weights = [], [], []",
        "    returns *= mask\n    losses, clipped, weights = [], [], []",
    ),
    Mutant(
        "ppo.value_loss",
        "weights read as 0/1",
        "test_the_mask_may_be_weights",
        "weights",
        "weights.append(w.to(values.dtype))",
        "weights.append((w != 0).to(values.dtype))",
    ),
    Mutant(
        "ppo.value_loss",
        "5 rows written in",
        "test_value_loss_works_for_any_batch_size_and_reply_length",
        "size",
        "for b in range(mask.shape[0]):",
        "for b in range(5):",
    ),
    Mutant(
        "ppo.value_loss",
        "means in float64 whatever the inputs' dtype",
        "test_value_loss_in_float32_and_bfloat16_with_integer_and_bool_masks",
        None,
        "weights.append(w.to(values.dtype))",
        "weights.append(w.double())",
    ),
    # --- reward.reward_from_logits
    Mutant(
        "reward.reward_from_logits",
        "softmax over the mechanisms",
        "test_softmax_is_over_the_levels_of_each_mechanism",
        "mechanisms",
        "e[targets[b, k]] / e.sum()",
        "e[targets[b, k]] / torch.exp(logits[b, :, targets[b, k]].float()).sum()",
    ),
    Mutant(
        "reward.reward_from_logits",
        "a sum of probabilities, not a product",
        "test_reward_is_the_product_of_the_target_levels_probabilities",
        "sum",
        "torch.stack(probs).prod()",
        "torch.stack(probs).sum()",
    ),
    Mutant(
        "reward.reward_from_logits",
        "shifts the caller's logits in place (a stable softmax on the input)",
        "test_reward_leaves_its_inputs_unchanged",
        "in_place",
        "    rewards = []",
        "    logits -= logits.max(dim=-1, keepdim=True).values\n    rewards = []",
    ),
    Mutant(
        "reward.reward_from_logits",
        "a stable softmax in place on logits.float() (the caller's own tensor in float32)",
        "test_reward_leaves_its_inputs_unchanged",
        "alias",
        "    rewards = []",
        "    logits = logits.float()\n"
        "    logits -= logits.max(dim=-1, keepdim=True).values\n"
        "    rewards = []",
    ),
    Mutant(
        "reward.reward_from_logits",
        "one reward per mechanism",
        "test_reward_gives_one_number_per_reply",
        None,
        "rewards.append(torch.stack(probs).prod())",
        "rewards.append(torch.stack(probs))",
    ),
    Mutant(
        "reward.reward_from_logits",
        "5 replies written in",
        "test_reward_works_for_any_batch_size",
        "size",
        "for b in range(logits.shape[0]):",
        "for b in range(5):",
    ),
    Mutant(
        "reward.reward_from_logits",
        "the reward in float64",
        "test_reward_in_float32_and_bfloat16",
        None,
        "e = torch.exp(logits[b, k].float())",
        "e = torch.exp(logits[b, k].double())",
    ),
]


def source_of(m):
    """The function text of a mutant: its base version with `correct` replaced by `wrong`."""
    if m.base == "source":
        return m.wrong
    source = {"loops": LOOPS, "vector": VECTOR}[m.base][m.exercise]
    assert source.count(m.correct) == 1, (m.exercise, m.correct)
    return source.replace(m.correct, m.wrong)


def find_mutant(mistake, exercise=None):
    """The mutant of that mistake (of that exercise, where two exercises name a mistake so)."""
    found = [m for m in MUTANTS if m.mistake == mistake and exercise in (None, m.exercise)]
    assert len(found) == 1, (mistake, exercise, len(found))
    return found[0]


def compile_function(exercise, source):
    """The function defined by source, with the module's names (torch, per_token_kl, ...) in
    scope."""
    module = {"ppo": ppo, "reward": reward}[exercise.split(".")[0]]
    namespace = dict(vars(module))
    exec(source, namespace)
    return namespace[exercise.split(".")[1]]


def check_module(exercise):
    return load(ROOT / lab.EXERCISES[exercise], f"lab_check_{exercise.split('.')[1]}")


def failing_checks(exercise, function, monkeypatch):
    """Run every check of the exercise in this process, in file order, with `function` in place of
    the module's; {check: (its docstring on one line, error)}."""
    module_name, name = exercise.split(".")
    monkeypatch.setattr({"ppo": ppo, "reward": reward}[module_name], name, function)
    checks = check_module(exercise)
    failures = {}
    for test_name, test in vars(checks).items():
        if test_name.startswith("test_") and callable(test):
            try:
                test()
            except Exception as e:
                failures[test_name] = (" ".join(test.__doc__.split()), f"{type(e).__name__}: {e}")
    return failures


def causes_of(exercise):
    """{key: words} of every cause the checks of an exercise may name: its check file's CAUSES and
    checklib's."""
    return {**checklib.CAUSES, **check_module(exercise).CAUSES}


AVAILABLE = lab.available_exercises(ROOT)  # ppo.grpo_advantages only where ppo.py has it


def reference_function(exercise):
    module, name = exercise.split(".")
    return getattr({"ppo": ppo, "reward": reward}[module], name)


@pytest.mark.parametrize("style", ["loops", "vector", "reference"])
@pytest.mark.parametrize("exercise", [e for e in LOOPS if e in AVAILABLE])
def test_correct_implementations_pass_every_check(exercise, style, monkeypatch):
    """Three correct implementations of each exercise pass all of its checks (float64, float32 and
    bfloat16 inputs, int64, bool and float masks, other sizes): Python loops, tensor code other than
    the reference's (VECTOR), and the repository's own function."""
    if style == "reference":
        function = reference_function(exercise)
    else:
        function = compile_function(exercise, {"loops": LOOPS, "vector": VECTOR}[style][exercise])
    assert failing_checks(exercise, function, monkeypatch) == {}


@pytest.mark.parametrize(
    "m",
    [m for m in MUTANTS if m.exercise in AVAILABLE],
    ids=[m.mistake for m in MUTANTS if m.exercise in AVAILABLE],
)
def test_each_usual_mistake_fails_the_check_that_names_it(m, monkeypatch):
    """GAE without λ or bootstrapping past </s>, an RLOO baseline with the reply itself, a KL of the
    wrong sign or unclamped, a ratio against the wrong log-probs, a value loss without its clip, an
    alias written in place, an int64 output, a size written in, dual-clip PPO, an ignored ε, weights
    read as 0/1 ... each fails, first on the check named; its message names the cause planted (or
    none, where none is confirmed), and the words of no other cause appear in its line."""
    failures = failing_checks(m.exercise, compile_function(m.exercise, source_of(m)), monkeypatch)
    assert failures, f"{m.mistake}: every check passed"
    first, (doc, message) = next(iter(failures.items()))
    assert first == m.check, f"{m.mistake}: the first check to fail is not {m.check}: {failures}"
    causes = causes_of(m.exercise)
    if m.cause is not None:
        assert causes[m.cause] in message, f"{m.mistake}: {message}"
    others = [key for key, words in causes.items() if key != m.cause and words in doc + message]
    assert not others, f"{m.mistake}: the line names {others}: {doc} — {message}"


def test_every_cause_a_check_names_is_shown_on_its_own_mistake():
    """Each cause that lab/checks may name (the CAUSES of each check file, and checklib's) is the
    cause planted by at least one mistake of MUTANTS; the test above shows it named there, and no
    other cause named on any mistake."""
    planted = {(m.exercise, m.cause) for m in MUTANTS if m.exercise in AVAILABLE}
    # a caller's mistake, not a student's: shown by the test below
    planted.add(("ppo.policy_loss", "reference"))
    for exercise in AVAILABLE:
        own = set(check_module(exercise).CAUSES)
        assert own <= {cause for e, cause in planted if e == exercise}, exercise
    shared = {cause for _, cause in planted}
    assert set(checklib.CAUSES) <= shared


# The catch-all checks ("... matches the definition"), whose message is the numbers that differ:
# every mistake that reaches them is caught earlier by a check that names it, so no planted mistake
# fails them first.
CATCH_ALL = {
    "test_gae_matches_the_definition",
    "test_rloo_matches_the_definition",
    "test_kl_matches_the_definition",
    "test_kl_penalized_rewards_match_the_definition",
    "test_policy_loss_and_statistics_match_the_definition",
    "test_value_loss_matches_the_definition",
    "test_reward_matches_the_definition",
    "test_rloo_advantages_sum_to_zero_per_context",
    "test_reward_lies_in_0_1_and_is_1_for_certain_identifiers",
}


def test_every_check_is_the_first_to_fail_on_a_planted_mistake():
    """Each check of lab/checks (but the catch-all comparisons with the definition) is the first to
    fail on at least one mistake of MUTANTS, so its message is tested against the mistake that
    triggers it; the parametrized test above asserts that it does fail first."""
    checks = set()
    for exercise in AVAILABLE:
        checks |= {name for name in vars(check_module(exercise)) if name.startswith("test_")}
    named = {m.check for m in MUTANTS if m.exercise in AVAILABLE}
    assert checks - named - CATCH_ALL == set(), "checks no planted mistake fails first"


def test_a_caller_passing_the_reference_log_probs_as_old_log_probs_is_told_so(monkeypatch):
    """policy_loss given the reference model's log-probs where the rollout policy's belong gives a
    detectably wrong loss, and the check says that is the ratio against the reference model."""
    checks = load(CHECKS / "test_policy_loss.py", "lab_check_policy_loss_ref")
    correct = ppo.policy_loss
    ref, old, _, _, _ = checks.rollout(38)  # the data of the check below

    def policy_loss_fed_ref(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
        if old_logprobs.shape == ref.shape and torch.equal(old_logprobs, old):
            old_logprobs = ref  # what a caller that mixes up the two would pass
        return correct(logprobs, old_logprobs, advantages, mask, clip_range)

    monkeypatch.setattr(ppo, "policy_loss", policy_loss_fed_ref)
    with pytest.raises(AssertionError, match="ratio against the reference model's log-probs"):
        checks.test_ratio_is_against_the_rollout_policy_not_the_reference_model()


def test_the_bfloat16_tolerance_is_far_below_what_a_mistake_moves(monkeypatch):
    """The bfloat16 tolerance (3 % of the largest value) is wide enough for bfloat16's rounding (the
    correct versions pass above) and far narrower than a mistake: the GAE with λ ignored and the
    RLOO baseline with the reply itself, run in bfloat16 only (float64 and float32 delegated to the
    correct function), fail the bfloat16 comparison."""
    for exercise, mistake, dtype_check in (
        (
            "ppo.gae",
            "λ ignored (λ = 1)",
            "test_gae_in_float32_and_bfloat16_with_integer_and_bool_masks",
        ),
        (
            "ppo.rloo_advantages",
            "baseline is the mean of the group, the reply included",
            "test_rloo_in_float32_and_bfloat16",
        ),
    ):
        wrong = compile_function(exercise, source_of(find_mutant(mistake, exercise)))
        right = reference_function(exercise)

        def in_bfloat16_only(*args, wrong=wrong, right=right):
            return (wrong if args[0].dtype == torch.bfloat16 else right)(*args)

        monkeypatch.setattr(ppo, exercise.split(".")[1], in_bfloat16_only)
        with pytest.raises(AssertionError, match="bfloat16 inputs"):
            getattr(check_module(exercise), dtype_check)()


# ---------------------------------------------------------------------------------------- new


def test_blanking_keeps_signature_docstring_and_everything_else():
    """A blanked function keeps its signature and docstring (with its equations) and raises
    NotImplementedError naming the exercise; every other line of the file, comments included, stays.
    """
    source = (ROOT / "ppo.py").read_text(encoding="utf-8")
    blanked = lab.blank_function(source, "gae", "ppo.gae")
    node = lab.find_function(blanked, "gae")
    original = lab.find_function(source, "gae")
    assert [a.arg for a in node.args.args] == [a.arg for a in original.args.args]
    assert (
        node.body[0].value.value == original.body[0].value.value
        and "δ_t" in node.body[0].value.value
    )
    assert len(node.body) == 2 and "lab exercise: implement ppo.gae" in blanked
    before = source.splitlines()
    after = blanked.splitlines()
    removed = original.end_lineno - original.body[0].end_lineno
    assert after[: original.body[0].end_lineno] == before[: original.body[0].end_lineno]
    assert after[original.body[0].end_lineno + 1 :] == before[original.end_lineno :]
    assert len(after) == len(before) - removed + 1
    namespace = {}
    exec(compile(blanked, "ppo.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="ppo.gae"):
        namespace["gae"](torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))


def test_exercise_names_may_be_bare_or_qualified_and_unknown_names_are_one_error_line(
    tmp_path, capsys
):
    """`--blank=gae,ppo.rloo_advantages` names two exercises; an unknown name is one line listing
    the choices, exit 2, and writes nothing; an existing non-empty directory is refused with one
    line."""
    available = lab.available_exercises(ROOT)
    assert lab.resolve(["gae", "ppo.rloo_advantages", "ppo.gae"], available) == [
        "ppo.gae",
        "ppo.rloo_advantages",
    ]
    assert lab.resolve(["all"], available) == available
    assert {
        "ppo.gae",
        "ppo.rloo_advantages",
        "ppo.per_token_kl",
        "ppo.kl_penalized_rewards",
        "ppo.policy_loss",
        "ppo.value_loss",
        "reward.reward_from_logits",
    } <= set(available)
    assert ("ppo.grpo_advantages" in available) == hasattr(ppo, "grpo_advantages")
    assert lab.main(["new", str(tmp_path / "copy"), "--blank=gae,gea"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'gea'" in err and "ppo.rloo_advantages" in err
    assert not (tmp_path / "copy").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert lab.main(["new", str(tmp_path / "full"), "--blank=gae"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not empty" in err


@pytest.mark.parametrize("where", ["my-emprl", "lab/my-emprl", "."])
def test_new_refuses_a_directory_inside_the_repository(where, capsys, monkeypatch):
    """`lab.py new DIR` with DIR inside the repository (its root, a folder of it, the root itself)
    is one error line that suggests the same name beside the repository (`../my-emprl` from the
    root), exit 1, and writes nothing: a copy inside would be collected by the repository's tests
    and copied into later copies."""
    monkeypatch.chdir(ROOT)
    before = sorted(p.name for p in ROOT.iterdir())
    assert lab.main(["new", where, "--blank=gae"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "inside the repository" in err and "python lab/lab.py new ../" in err, err
    if where != ".":
        assert f"new ../{Path(where).name}`" in err
    assert sorted(p.name for p in ROOT.iterdir()) == before
    assert not (ROOT / "lab" / "my-emprl").exists()


def new_copy(path, *blank):
    assert lab.main(["new", str(path), f"--blank={','.join(blank)}"]) == 0
    return path


def check(path, *extra, timeout=300):
    p = subprocess.run(
        [sys.executable, str(ROOT / "lab" / "lab.py"), "check", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


def verdicts(stdout):
    """{function: the rest of its PASS / FAIL line}"""
    return {
        line.split()[1].rstrip(":"): line
        for line in stdout.splitlines()
        if line.startswith(("PASS ", "FAIL "))
    }


# ---------------------------------------------------------------------------------------- check


@pytest.mark.slow
def test_a_blank_copy_fails_check_naming_each_blanked_function(tmp_path):
    """A copy with gae and reward_from_logits blanked: `check` prints FAIL for exactly those two,
    saying they are not implemented yet, and exits 1. The copy holds what the student edits and
    runs, the program's top-level .py files, and nothing else: no tests, no grader checks, no key
    (lab/answers.md), no docs, runs or .git."""
    copy = new_copy(tmp_path / "student", "gae", "reward.reward_from_logits")
    assert json.loads((copy / ".lab.json").read_text()) == {
        "blanked": ["reward.reward_from_logits", "ppo.gae"]
    }
    program = sorted(p.name for p in ROOT.glob("*.py"))
    assert {"ppo.py", "reward.py", "train.py", "emprl.py"} <= set(program)
    assert sorted(p.name for p in copy.iterdir()) == sorted(program + [".lab.json"])
    p = check(copy, "--no-run")
    assert p.returncode == 1
    not_yet = "not implemented yet (it raises NotImplementedError)"
    assert verdicts(p.stdout) == {
        "reward.reward_from_logits": f"FAIL reward.reward_from_logits: {not_yet}",
        "ppo.gae": f"FAIL ppo.gae: {not_yet}",
    }


@pytest.mark.slow
def test_the_unmodified_repository_passes_every_check(tmp_path):
    """A copy with nothing blanked: `check` checks every exercise, and every one passes (exit 0)."""
    p = check(new_copy(tmp_path / "student"), "--no-run")
    assert p.returncode == 0, p.stdout + p.stderr
    assert verdicts(p.stdout) == {e: f"PASS {e}" for e in lab.available_exercises(ROOT)}


@pytest.mark.slow
def test_a_wrong_gae_and_a_wrong_rloo_baseline_fail_with_the_reason(tmp_path):
    """A student's GAE that ignores λ and an RLOO whose baseline is the mean of all k replies (the
    reply itself included), written into the copy's ppo.py: both FAIL, each with the check's words,
    the numbers that differ and the cause, which the check confirmed."""
    copy = new_copy(tmp_path / "student", "gae", "rloo_advantages")
    source = (copy / "ppo.py").read_text(encoding="utf-8")
    for mistake in ("λ ignored (λ = 1)", "baseline is the mean of the group, the reply included"):
        m = find_mutant(mistake)
        source = lab.replace_function(source, m.exercise.split(".")[1], source_of(m))
    (copy / "ppo.py").write_text(source, encoding="utf-8")
    p = check(copy, "--no-run")
    assert p.returncode == 1
    lines = verdicts(p.stdout)
    assert lines["ppo.gae"].startswith("FAIL ppo.gae: λ weighs the later TD errors")
    assert (
        "advantages with λ = 0" in lines["ppo.gae"] and "the definition gives" in lines["ppo.gae"]
    )
    assert lines["ppo.rloo_advantages"].startswith(
        "FAIL ppo.rloo_advantages: The baseline of "
        "reply i is the mean "
        "reward of the *other* k - 1 replies"
    )
    assert "advantages: at [0] it is -1, the definition gives -2" in lines["ppo.rloo_advantages"]
    assert causes_of("ppo.gae")["lambda"] in lines["ppo.gae"]
    assert causes_of("ppo.rloo_advantages")["all"] in lines["ppo.rloo_advantages"]


@pytest.mark.slow
def test_a_syntax_error_in_the_students_code_fails_each_of_its_functions(tmp_path):
    """ppo.py that does not parse: every ppo exercise FAILs with the syntax error, not a
    traceback."""
    copy = new_copy(tmp_path / "student", "gae", "value_loss")
    source = (copy / "ppo.py").read_text(encoding="utf-8")
    # never closed
    (copy / "ppo.py").write_text(source + "\n\ndef helper(x):\n    return (x,\n", encoding="utf-8")
    p = check(copy, "--no-run")
    assert p.returncode == 1
    for exercise in ("ppo.gae", "ppo.value_loss"):
        assert verdicts(p.stdout)[exercise].startswith(
            f"FAIL {exercise}: the checks cannot import the code: "
        )
        assert "SyntaxError" in verdicts(p.stdout)[exercise]


@pytest.mark.slow
def test_loop_based_gae_and_rloo_pass_and_train_as_the_reference(tmp_path):
    """A student's correct GAE and RLOO written with Python loops pass their checks; then `check`
    trains the tiny preset on made-up data with that code and with the reference functions, with PPO
    and with RLOO (rloo_advantages is an exercise), and both runs agree: PASS for each algorithm."""
    copy = new_copy(tmp_path / "student", "gae", "rloo_advantages")
    source = (copy / "ppo.py").read_text(encoding="utf-8")
    for exercise in ("ppo.gae", "ppo.rloo_advantages"):
        source = lab.replace_function(source, exercise.split(".")[1], LOOPS[exercise])
    (copy / "ppo.py").write_text(source, encoding="utf-8")
    p = check(copy)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = verdicts(p.stdout)
    assert (
        lines["ppo.gae"] == "PASS ppo.gae"
        and lines["ppo.rloo_advantages"] == "PASS ppo.rloo_advantages"
    )
    assert "PASS training check (ppo)" in p.stdout and "PASS training check (rloo)" in p.stdout, (
        p.stdout
    )
    assert "training check (grpo)" not in p.stdout


def plant_checks(copy):
    """A lab/checks folder in a copy, as a student might add one (copies have none): every check
    file of the grader's, emptied, and a conftest.py that would skip everything."""
    (copy / "lab" / "checks").mkdir(parents=True)
    for path in CHECKS.glob("*.py"):
        (copy / "lab" / "checks" / path.name).write_text("", encoding="utf-8")
    (copy / "lab" / "checks" / "conftest.py").write_text(
        "import pytest\npytest.skip('no checks', allow_module_level=True)\n", encoding="utf-8"
    )


@pytest.mark.slow
def test_the_copys_own_checks_are_not_used(tmp_path):
    """`check` grades with the grader's lab/checks: a copy given lab/checks files that are empty (or
    deleted), and a conftest.py that skips everything, still fails a GAE without λ, with the
    grader's message."""
    copy = new_copy(tmp_path / "student", "gae")
    plant_checks(copy)
    text = (copy / "ppo.py").read_text(encoding="utf-8")
    source = lab.replace_function(text, "gae", source_of(find_mutant("λ ignored (λ = 1)")))
    (copy / "ppo.py").write_text(source, encoding="utf-8")
    p = check(copy, "--no-run")
    assert p.returncode == 1
    assert verdicts(p.stdout)["ppo.gae"].startswith("FAIL ppo.gae: λ weighs the later TD errors"), (
        p.stdout
    )
    for path in (copy / "lab" / "checks").glob("*.py"):
        path.unlink()
    p = check(copy, "--no-run")
    assert p.returncode == 1 and verdicts(p.stdout)["ppo.gae"].startswith(
        "FAIL ppo.gae: λ weighs"
    ), p.stdout


def reference_source(exercise):
    module, name = exercise.split(".")
    text = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    node = lab.find_function(text, name)
    return "".join(text.splitlines(keepends=True)[node.lineno - 1 : node.end_lineno])


@pytest.mark.slow
def test_the_training_check_fails_a_value_loss_on_detached_values(tmp_path, capsys):
    """A value loss computed on values.detach() has the right value, so only a gradient check sees
    it in a unit test; the training check sees it too: the first iteration's statistics move beyond
    rounding (the shared decoder gets no value gradient), and it says so. (The unit checks are
    skipped here to reach the training check.)"""
    copy = new_copy(tmp_path / "student", "value_loss")
    wrong = reference_source("ppo.value_loss").replace(
        "vf_losses = (values - returns)", "vf_losses = (values.detach() - returns)"
    )
    wrong = wrong.replace(
        "values, old_values - clip_range_value", "values.detach(), old_values - clip_range_value"
    )
    assert wrong.count("detach()") == 2
    source = lab.replace_function(
        (copy / "ppo.py").read_text(encoding="utf-8"), "value_loss", wrong
    )
    (copy / "ppo.py").write_text(source, encoding="utf-8")
    capsys.readouterr()
    assert lab.training_check(copy, ["ppo.value_loss"]) is False
    out = capsys.readouterr().out
    assert "FAIL training check (ppo)" in out and "iteration 1 " in out, out
    # the replay of value_loss's first call with a gradient confirms the cause
    assert "ppo.value_loss (float32 inputs, an int64 mask, " in out, out
    assert "gradients: no gradient reaches values, the reference's does" in out, out
    assert "dtype:" not in out and "in-place writes:" not in out, out


def test_the_training_check_trains_grpo_when_its_loss_is_an_exercise():
    """PPO always; RLOO with rloo_advantages; GRPO with grpo_advantages, and with policy_loss or
    per_token_kl (GRPO's loss passes per-reply weights as policy_loss's mask and differentiates
    per_token_kl's k3, which PPO does neither), where ppo.py has GRPO."""
    grpo = ["grpo"] if "ppo.grpo_advantages" in AVAILABLE else []
    assert lab.training_algos(["ppo.gae", "ppo.value_loss"], AVAILABLE) == ["ppo"]
    assert lab.training_algos(["ppo.rloo_advantages"], AVAILABLE) == ["ppo", "rloo"]
    for exercise in ("ppo.policy_loss", "ppo.per_token_kl", "ppo.grpo_advantages"):
        assert lab.training_algos([exercise], AVAILABLE) == ["ppo", *grpo], exercise
    assert lab.training_algos(AVAILABLE, AVAILABLE) == ["ppo", "rloo", *grpo]
    assert lab.training_algos(["ppo.policy_loss"], ["ppo.policy_loss"]) == ["ppo"]


def training_inputs(exercise):
    """(args, kwargs) of a call as training makes it: float32 tensors, an int64 mask, 4 rows of 12
    tokens; the loss inputs require a gradient."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 5, 1, 8])[:, None]).long()

    def x(scale=1.0):
        return (scale * torch.randn(4, 12, generator=g)) * mask

    if exercise == "ppo.gae":
        return (x(), x(), mask, 1.0, 0.95), {}
    if exercise == "ppo.value_loss":
        return (x().requires_grad_(True), x(), x(), mask, 0.2), {}
    if exercise == "ppo.kl_penalized_rewards":
        return (torch.randn(4, generator=g), x(), x(), mask, 0.2), {}
    if exercise == "ppo.per_token_kl":
        return (x(), x(), mask), {}
    raise ValueError(exercise)


@pytest.mark.parametrize(
    "exercise, mistake, found",
    [
        ("ppo.gae", None, []),
        ("ppo.value_loss", None, []),
        # training's values are 0 after </s> already: `values *= mask` changes nothing there
        ("ppo.gae", "zeroes the padding of the caller's values in place", []),
        (
            "ppo.gae",
            "outputs made with torch.zeros_like(mask) (integers with an int64 mask)",
            [
                "dtype: advantages in int64, the reference's in float32",
                "dtype: returns in int64, the reference's in float32",
            ],
        ),
        ("ppo.gae", "λ ignored (λ = 1)", ["values: advantages at [", "values: returns at ["]),
        (
            "ppo.value_loss",
            "computed on values.detach() (the value head never learns)",
            ["gradients: no gradient reaches values, the reference's does"],
        ),
        ("ppo.kl_penalized_rewards", "the KL settings not passed on", []),
        (
            "ppo.per_token_kl",
            "the log-ratio computed in place on logprobs.float() (the caller's own tensor in "
            "float32)",
            ["in-place writes: it changed its argument logprobs"],
        ),
    ],
)
def test_the_replay_of_a_first_call_names_what_differs(exercise, mistake, found):
    """The training check's replay (lab.replay) of one call as training makes it (float32, an int64
    mask): a correct function finds nothing; an argument written in place, an output in the mask's
    dtype, values that differ and a gradient that does not reach its input are each found, with
    their kind first ("in-place writes", "dtype", "values", "gradients"); a mistake that changes
    nothing on this call (the KL settings at their defaults, a mask applied in place to values that
    are 0 after </s> already) finds nothing."""
    source = source_of(find_mutant(mistake, exercise)) if mistake else LOOPS[exercise]
    mine = compile_function(exercise, source)
    theirs = reference_function(exercise)
    args, kwargs = training_inputs(exercise)
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    result = mine(*args, **kwargs)
    condition, findings = lab.replay(exercise, mine, theirs, args, kwargs, before, result)
    assert condition == "float32 inputs, an int64 mask, 4 rows of 12 tokens", condition
    assert len(findings) == len(found), findings
    for finding, start in zip(findings, found):
        assert finding.startswith(start), (finding, start)


def test_the_replay_of_a_call_with_a_gradient_keeps_it_as_training_made_it():
    """GRPO differentiates the KL: per_token_kl gets log-probs that require a gradient and are the
    result of a computation. The replay passes its copies the same way, so a student's function that
    writes into them in place (allowed there, not on a leaf) is replayed, not stopped: the write is
    found, and the gradients compared."""
    m = find_mutant(
        "the log-ratio computed in place on logprobs.float() (the caller's own tensor in float32)"
    )
    mine = compile_function(m.exercise, source_of(m))
    theirs = reference_function(m.exercise)
    (logprobs, ref_logprobs, mask), _ = training_inputs(m.exercise)
    args = (logprobs.clone().requires_grad_(True) * 1, ref_logprobs, mask, None, None, "k3")
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    result = mine(*args)
    _, findings = lab.replay(m.exercise, mine, theirs, args, {}, before, result)
    assert findings and findings[0].startswith("in-place writes: it changed its argument logprobs")
    assert not any("the replay failed" in f for f in findings), findings


def test_the_first_iteration_says_where_a_difference_starts():
    """Where the replay finds nothing, the training check says where the first iteration's
    differences start: kl or the first ratio (read from the rollout's log-probs after the
    functions ran) point to an in-place write, the update's statistics alone to the losses or their
    gradients, nothing to a difference that comes later."""
    line = {"stage": "ppo", **{key: 1.0 for key in lab.FIRST_FIELDS}}
    run = ([dict(line, step=i) for i in range(1, 21)], {"emprl": {"reward": 0.1}})
    moved = lambda **fields: ([dict(run[0][0], **fields)] + run[0][1:], run[1])  # noqa: E731
    assert "in-place writes" in lab.first_iteration_hint(moved(kl=45.0, ratio_first=0.07), run)
    assert "in-place writes" in lab.first_iteration_hint(moved(length=3.0), run)
    assert "the reward" in lab.first_iteration_hint(moved(score=0.5), run)
    update = lab.first_iteration_hint(moved(approx_kl=1.1, pg_loss=2.0), run)
    assert update.startswith("pg_loss, approx_kl differ in iteration 1: the update"), update
    assert "iteration 1 agrees" in lab.first_iteration_hint(run, run)


@pytest.mark.slow
def test_a_loop_based_policy_loss_trains_as_the_reference_with_ppo_and_grpo(tmp_path):
    """policy_loss written with Python loops, its means weighted by the mask: `check` passes it and
    trains PPO and GRPO (GRPO passes per-reply weights as the mask), both as the reference."""
    copy = new_copy(tmp_path / "student", "policy_loss")
    text = (copy / "ppo.py").read_text(encoding="utf-8")
    text = lab.replace_function(text, "policy_loss", LOOPS["ppo.policy_loss"])
    (copy / "ppo.py").write_text(text, encoding="utf-8")
    p = check(copy, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS training check (ppo)" in p.stdout, p.stdout
    if "ppo.grpo_advantages" in AVAILABLE:
        assert "PASS training check (grpo)" in p.stdout, p.stdout


def test_compare_runs_tolerates_rounding_and_names_what_differs():
    """compare_runs: identical runs and runs that differ by float32 rounding agree; a first
    iteration whose approx_kl moved by 1 % is named, and so is a final score beyond the seeds'
    spread; nan agrees with nan only."""
    line = {"stage": "ppo", **{key: 1.0 for key in lab.FIRST_FIELDS}}
    run = ([dict(line, step=i) for i in range(1, 21)], {"emprl": {"reward": 0.1}})
    assert lab.compare_runs(run, run) == []
    rounded = ([dict(r, approx_kl=r["approx_kl"] * (1 + 1e-6)) for r in run[0]], run[1])
    assert lab.compare_runs(rounded, run) == []
    moved = ([dict(run[0][0], approx_kl=1.01)] + run[0][1:], run[1])
    assert [line.split(":")[0] for line in lab.compare_runs(moved, run)] == [
        "iteration 1 approx_kl"
    ]
    stuck = ([dict(r, score=r["score"] - 0.5) if r["step"] > 10 else r for r in run[0]], run[1])
    assert [line.split(",")[0] for line in lab.compare_runs(stuck, run)] == ["score"]
    nan = ([dict(r, explained_var=math.nan) for r in run[0]], run[1])
    assert lab.compare_runs(nan, nan) == [] and lab.compare_runs(nan, run) != []


# ---------------------------------------------------------------------------------------- check-run
# in tests/test_check_run.py

RECORDS = ROOT / "docs" / "runs"  # the run records, whose ranges lab/metrics.md holds


# ----------------------------------------------------------------------------------- lab/metrics.md


def test_metrics_md_ranges_are_the_records_and_every_field_is_explained():
    """lab/metrics.md holds the range tables that lab/metric_ranges.py makes of docs/runs (re-made
    records fail here until `python lab/metric_ranges.py --write`), and its glossary names every
    field of a PPO log line and every number of the sft / emprl sections of results.json."""
    ranges = load(ROOT / "lab" / "metric_ranges.py", "lab_metric_ranges")
    text = (ROOT / "lab" / "metrics.md").read_text(encoding="utf-8")
    assert text.split(ranges.BEGIN, 1)[1].split(ranges.END, 1)[0] == "\n" + ranges.tables(RECORDS)
    glossary = text.split(ranges.END, 1)[1]
    run = lab.read_run(RECORDS / "cpu")
    for field in run["log"][0]:
        if field != "stage":
            assert f"`{field}`" in glossary, field
    for key in run["results"]["sft"]:
        assert f"`{key}`" in glossary or f"`{key.rsplit('_', 1)[0]}_" in glossary, key


# mistakes that once passed every check, one per function, planted together in one student copy
PLANTED = {
    "ppo.policy_loss": "unclipped term detached (same value, gradient halved at ρ = 1)",
    "ppo.value_loss": "computed on values.detach() (the value head never learns)",
    "ppo.grpo_advantages": "ε under the square root, sqrt(var + ε)",
    "ppo.gae": "zeroes the padding of the caller's values in place",
    "ppo.per_token_kl": "no gradient (computed on detached log-probs)",
    "ppo.kl_penalized_rewards": "zeroes the padding of the caller's log-probs in place",
    "ppo.rloo_advantages": "shifts the caller's rewards in place",
    "reward.reward_from_logits": "shifts the caller's logits in place (a stable softmax on the "
    "input)",
}


def plant(copy, mutants):
    """Write each mutant's function into the copy (one per exercise)."""
    for m in mutants:
        path = copy / f"{m.exercise.split('.')[0]}.py"
        text = lab.replace_function(
            path.read_text(encoding="utf-8"), m.exercise.split(".")[1], source_of(m)
        )
        path.write_text(text, encoding="utf-8")


def assert_fails_as_planted(lines, m):
    """The FAIL line of m's exercise starts with the docstring of the check m names, names m's
    cause (or none) and no other cause."""
    doc = " ".join(getattr(check_module(m.exercise), m.check).__doc__.split())
    line = lines[m.exercise]
    assert line.startswith(f"FAIL {m.exercise}: {doc} — "), (m.mistake, line)
    causes = causes_of(m.exercise)
    assert m.cause is None or causes[m.cause] in line, (m.mistake, line)
    others = [key for key, words in causes.items() if key != m.cause and words in line]
    assert not others, (m.mistake, others, line)


@pytest.mark.slow
def test_planted_mistakes_fail_in_a_copy_whose_checks_are_emptied(tmp_path):
    """A student copy with every exercise blanked, one planted mistake per function (the detached
    unclipped term, values.detach(), sqrt(var + ε), an in-place gae, ...), and lab/checks files of
    its own, emptied: `check` fails every function, each with the docstring of the grader's check
    that the mistake fails first, and the cause."""
    copy = new_copy(tmp_path / "student", "all")
    plant_checks(copy)
    planted = [find_mutant(PLANTED[e], e) for e in AVAILABLE if e in PLANTED]
    plant(copy, planted)
    # the blanked functions not planted above: the repository's own
    for exercise in AVAILABLE:
        if exercise not in PLANTED:
            path = copy / f"{exercise.split('.')[0]}.py"
            text = lab.replace_function(
                path.read_text(encoding="utf-8"), exercise.split(".")[1], reference_source(exercise)
            )
            path.write_text(text, encoding="utf-8")
    p = check(copy, "--no-run")
    assert p.returncode == 1
    lines = verdicts(p.stdout)
    for m in planted:
        assert_fails_as_planted(lines, m)


# Mistakes that the checks once missed because they called every function in float64 with float64
# masks, 7 tokens and ratios near 1 (an audit of the grader with planted student code found them),
# and mistakes whose message once named a cause it had not checked (λ and time-index mistakes in
# GAE told "bootstraps past </s>", RLOO scalings told "the baseline leaves the reply itself out").
TRAINING_CONDITIONS = [
    "a stable softmax in place on logits.float() (the caller's own tensor in float32)",
    "the log-ratio computed in place on logprobs.float() (the caller's own tensor in float32)",
    "masks the values in place through values.float() (the caller's own tensor in float32)",
    "outputs made with torch.zeros_like(mask) (integers with an int64 mask)",
    "the rewards copied into torch.zeros_like(mask) (integers with an int64 mask)",
    "the KL made with torch.zeros_like(mask) (integers with an int64 mask)",
    "outputs of 7 tokens",
    "7 tokens written in",
    "dual-clip PPO (the loss of A < 0 capped at -3A)",
    "the eps argument ignored (1e-4 written in)",
    "a mean over x[mask.bool()] (per-reply weights read as 0/1)",
    "weights read as 0/1",
    "λ also on the TD error itself (A_t = λ·δ_t + γλ·A_{t+1})",
    "the time index runs forwards (V_{t-1} for V_{t+1})",
    "scaled by (k - 1)/k instead of k/(k - 1)",
    "the others' mean scaled by k/(k - 1) once more",
]


# kl_penalized_rewards calls per_token_kl: a mistake in the one shows in the other's checks
CALLS = {("ppo.kl_penalized_rewards", "ppo.per_token_kl")}


def rounds(mutants):
    """The mutants in rounds of at most one per exercise (a copy holds one version of each), and
    never two exercises one of which calls the other."""

    def apart(a, b):
        return a != b and (a, b) not in CALLS and (b, a) not in CALLS

    out = []
    for m in mutants:
        free = next((r for r in out if all(apart(x.exercise, m.exercise) for x in r)), None)
        if free is None:
            out.append(free := [])
        free.append(m)
    return out


PLANTED_IN_TRAINING_CONDITIONS = [
    m for name in TRAINING_CONDITIONS for m in MUTANTS if m.mistake == name
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "planted",
    rounds([m for m in PLANTED_IN_TRAINING_CONDITIONS if m.exercise in AVAILABLE]),
    ids=lambda r: "; ".join(m.mistake for m in r),
)
def test_mistakes_of_training_conditions_fail_lab_py_check(tmp_path, planted):
    """Each mistake of TRAINING_CONDITIONS, written into a student copy (one per function a round)
    and graded by `python lab/lab.py check DIR --no-run`, fails its function with the docstring of
    the check named in MUTANTS, the cause planted where the check confirms one, and no other
    cause."""
    copy = new_copy(tmp_path / "student", *[m.exercise for m in planted])
    plant(copy, planted)
    p = check(copy, "--no-run")
    assert p.returncode == 1, p.stdout
    lines = verdicts(p.stdout)
    for m in planted:
        assert_fails_as_planted(lines, m)


def test_every_mistake_of_training_conditions_is_planted():
    """TRAINING_CONDITIONS names mistakes of MUTANTS (each exactly one), and each exercise has its
    mistakes of training conditions: an alias written in place, an int64 output, a size written in
    (where a mask or a length is involved), dual-clip PPO, an ignored ε, weights read as 0/1."""
    for name in TRAINING_CONDITIONS:
        assert sum(m.mistake == name for m in MUTANTS) >= 1, name
    causes = {m.cause for m in PLANTED_IN_TRAINING_CONDITIONS}
    assert {"alias", "mask_dtype", "size", "dual_clip", "eps_ignored", "weights"} <= causes


def test_lab_sheet_runner_finds_every_command_of_the_sheet():
    """benchmarks/lab_sheet.py, which runs the sheet as written, reads every command a student
    types: each `python train.py` line of lab/README.md's code blocks once per occurrence, each
    heredoc whole up to its EOF, the python block of exercise 1 as one script, and never the setup
    block (venv and pip)."""
    spec = importlib.util.spec_from_file_location("lab_sheet", ROOT / "benchmarks" / "lab_sheet.py")
    sheet_runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sheet_runner)
    sheet = (ROOT / "lab" / "README.md").read_text(encoding="utf-8")
    found = sheet_runner.commands(sheet)
    blocks = "".join(body for _, body in sheet_runner.FENCE.findall(sheet))
    train = [c for k, c in found if k == "bash" and c.startswith("python train.py")]
    assert (
        len(train) == blocks.count("\npython train.py") + blocks.startswith("python train.py") > 0
    )
    heredocs = [c for k, c in found if "<<'EOF'" in c]
    assert len(heredocs) == blocks.count("<<'EOF'") > 0 and all(
        c.endswith("\nEOF") for c in heredocs
    )
    assert any(k == "python" and "reward_from_logits" in c for k, c in found)
    assert not any("pip install" in c or "python -m venv" in c for _, c in found)
