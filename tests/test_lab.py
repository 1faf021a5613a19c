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


# ---------------------------------------------------------------------------- what a student writes

# Correct implementations written the slow, obvious way (Python loops over rows and tokens), nothing
# like the reference's tensor code: the checks must accept them.
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
    """Token by token, then means."""
    losses, ratios, clipped, kl, kl3 = [], [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                log_ratio = logprobs[b, t] - old_logprobs[b, t]
                ratio = torch.exp(log_ratio)
                unclipped = -advantages[b, t] * ratio
                clip = -advantages[b, t] * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                losses.append(torch.maximum(unclipped, clip))
                ratios.append(ratio.detach())
                clipped.append((clip > unclipped).to(ratio.dtype).detach())
                kl.append(0.5 * log_ratio.detach() ** 2)
                kl3.append((ratio - 1 - log_ratio).detach())
    mean = lambda xs: torch.stack(xs).mean()
    return mean(losses), {"ratio": mean(ratios), "clipfrac": mean(clipped), "approx_kl": mean(kl),
                          "approx_kl_k3": mean(kl3)}
''',
    "ppo.value_loss": '''
def value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    """Token by token, then means."""
    losses, clipped = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                v_clip = torch.clamp(values[b, t], old_values[b, t] - clip_range_value,
                                     old_values[b, t] + clip_range_value)
                error = (values[b, t] - returns[b, t]) ** 2
                error_clip = (v_clip - returns[b, t]) ** 2
                losses.append(torch.maximum(error, error_clip))
                clipped.append((error_clip > error).to(values.dtype).detach())
    return 0.5 * torch.stack(losses).mean(), {"vf_clipfrac": torch.stack(clipped).mean()}
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
# GAE, log-softmax for the reward, std_mean for GRPO, ...). With LOOPS and the repository's own
# functions: three per exercise.
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
""",
    "ppo.value_loss": """
def value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    \"\"\"Over the real tokens only, selected first.\"\"\"
    real = mask.bool()
    v, v_old, r = values[real], old_values[real], returns[real]
    v_clip = v_old + (v - v_old).clamp(-clip_range_value, clip_range_value)
    error, error_clip = (v - r).square(), (v_clip - r).square()
    with torch.no_grad():
        clipfrac = (error_clip > error).to(v.dtype).mean()
    return torch.maximum(error, error_clip).mean() / 2, {"vf_clipfrac": clipfrac}
""",
    "reward.reward_from_logits": """
def reward_from_logits(logits, targets):
    \"\"\"exp of the summed log-softmax at the targets.\"\"\"
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return log_p.gather(-1, targets.long()[..., None])[..., 0].sum(dim=-1).exp()
""",
}


# The usual mistakes, each a one-line change of the loop version above: (exercise, mistake, the
# check that must fail, the correct text, the wrong text).
MUTANTS = [
    (
        "ppo.gae",
        "λ ignored (λ = 1)",
        "test_gae_uses_lambda",
        "delta + gamma * lam * next_advantage",
        "delta + gamma * next_advantage",
    ),
    (
        "ppo.gae",
        "bootstraps from the value after </s>",
        "test_gae_does_not_bootstrap_past_eos",
        "next_advantage, next_value = 0.0, 0.0",
        "next_advantage, next_value = 0.0, values[b, min(n, values.shape[1] - 1)]",
    ),
    (
        "ppo.rloo_advantages",
        "baseline is the mean of the group, the reply included",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        "group[i] - others / (k - 1)",
        "group[i] - group.mean()",
    ),
    (
        "ppo.rloo_advantages",
        "groups strided instead of consecutive",
        "test_rloo_groups_are_k_consecutive_replies",
        "group = rewards[start:start + k]",
        "group = rewards[start // k::len(rewards) // k]",
    ),
    (
        "ppo.grpo_advantages",
        "the biased std (over k, not k - 1)",
        "test_grpo_advantages_are_the_rewards_centred_and_scaled_per_context",
        "/ (k - 1))",
        "/ k)",
    ),
    (
        "ppo.grpo_advantages",
        "no ε (0 / 0 for equal rewards)",
        "test_equal_rewards_give_zero_advantages_not_nan",
        "(std + eps)",
        "std",
    ),
    (
        "ppo.per_token_kl",
        "wrong sign",
        "test_kl_is_log_pi_minus_log_pi_ref",
        "d = logprobs[b, t] - ref_logprobs[b, t]",
        "d = ref_logprobs[b, t] - logprobs[b, t]",
    ),
    (
        "ppo.per_token_kl",
        "unclamped",
        "test_kl_is_clamped_to_0_10_by_default",
        "x = torch.clamp(x, min=kl_min, max=kl_max)",
        "pass",
    ),
    ("ppo.per_token_kl", "not masked", "test_kl_is_0_after_eos", "if mask[b, t]:", "if True:"),
    (
        "ppo.kl_penalized_rewards",
        "score on the last column, not the last real token",
        "test_score_lands_on_the_last_real_token",
        "rewards[b, real[-1]] += scores[b]",
        "rewards[b, -1] += scores[b]",
    ),
    (
        "ppo.policy_loss",
        "ratio inverted (π_old / π)",
        "test_ratio_is_against_the_rollout_policy_not_the_reference_model",
        "log_ratio = logprobs[b, t] - old_logprobs[b, t]",
        "log_ratio = old_logprobs[b, t] - logprobs[b, t]",
    ),
    (
        "ppo.policy_loss",
        "optimistic clip (min instead of max)",
        "test_clipping_is_pessimistic",
        "torch.maximum(unclipped, clip)",
        "torch.minimum(unclipped, clip)",
    ),
    (
        "ppo.policy_loss",
        "ratio against the current policy itself (always 1)",
        "test_ratio_is_against_the_rollout_policy_not_the_reference_model",
        "log_ratio = logprobs[b, t] - old_logprobs[b, t]",
        "log_ratio = logprobs[b, t] - logprobs[b, t].detach()",
    ),
    (
        "ppo.policy_loss",
        "a mean over the padding too",
        "test_padding_is_ignored",
        "if mask[b, t]:",
        "if True:",
    ),
    (
        "ppo.value_loss",
        "no clip",
        "test_value_loss_clips_the_value_update",
        "torch.maximum(error, error_clip)",
        "error",
    ),
    (
        "ppo.value_loss",
        "no ½",
        "test_value_loss_is_half_the_mean_squared_error_inside_the_clip_range",
        "0.5 * torch.stack(losses).mean()",
        "torch.stack(losses).mean()",
    ),
    (
        "ppo.value_loss",
        "a mean over the padding too",
        "test_padding_is_ignored",
        "if mask[b, t]:",
        "if True:",
    ),
    (
        "reward.reward_from_logits",
        "softmax over the mechanisms",
        "test_softmax_is_over_the_levels_of_each_mechanism",
        "e[targets[b, k]] / e.sum()",
        "e[targets[b, k]] / torch.exp(logits[b, :, targets[b, k]].float()).sum()",
    ),
    (
        "reward.reward_from_logits",
        "a sum of probabilities, not a product",
        "test_reward_is_the_product_of_the_target_levels_probabilities",
        "torch.stack(probs).prod()",
        "torch.stack(probs).sum()",
    ),
    # the mistakes that change learning but not a value, and side effects
    (
        "ppo.policy_loss",
        "unclipped term detached (same value, gradient halved at ρ = 1)",
        "test_gradient_at_ratio_1_is_minus_the_advantage",
        "unclipped = -advantages[b, t] * ratio",
        "unclipped = -advantages[b, t] * ratio.detach()",
    ),
    (
        "ppo.policy_loss",
        "clipped term detached",
        "test_gradient_at_ratio_1_is_minus_the_advantage",
        "clip = -advantages[b, t] * torch.clamp(ratio,",
        "clip = -advantages[b, t] * torch.clamp(ratio.detach(),",
    ),
    (
        "ppo.policy_loss",
        "statistics still attached to the graph",
        "test_statistics_are_detached",
        "ratios.append(ratio.detach())",
        "ratios.append(ratio)",
    ),
    (
        "ppo.policy_loss",
        "approx_kl without the ½",
        "test_approx_kl_is_half_the_mean_squared_log_ratio",
        "kl.append(0.5 * log_ratio.detach() ** 2)",
        "kl.append(log_ratio.detach() ** 2)",
    ),
    (
        "ppo.policy_loss",
        "zeroes the padding of the caller's advantages in place",
        "test_policy_loss_leaves_its_inputs_unchanged",
        "    losses, ratios, clipped, kl, kl3 = [], [], [], [], []",
        "    advantages *= mask\n    losses, ratios, clipped, kl, kl3 = [], [], [], [], []",
    ),
    (
        "ppo.value_loss",
        "computed on values.detach() (the value head never learns)",
        "test_the_value_head_gets_the_gradient_of_the_definition",
        "    losses, clipped = [], []",
        "    values = values.detach()\n    losses, clipped = [], []",
    ),
    (
        "ppo.value_loss",
        "statistics still attached to the graph",
        "test_statistics_are_detached",
        '{"vf_clipfrac": torch.stack(clipped).mean()}',
        '{"vf_clipfrac": torch.stack(clipped).mean() + 0 * values.sum()}',
    ),
    (
        "ppo.value_loss",
        "zeroes the padding of the caller's returns in place",
        "test_value_loss_leaves_its_inputs_unchanged",
        "    losses, clipped = [], []",
        "    returns *= mask\n    losses, clipped = [], []",
    ),
    (
        "ppo.gae",
        "zeroes the padding of the caller's values in place",
        "test_gae_leaves_its_inputs_unchanged",
        "    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "    values *= mask\n    advantages, returns = torch.zeros_like(rewards), "
        "torch.zeros_like(rewards)",
    ),
    (
        "ppo.gae",
        "γ left out of δ",
        "test_gae_uses_gamma",
        "delta = rewards[b, t] + gamma * next_value - values[b, t]",
        "delta = rewards[b, t] + next_value - values[b, t]",
    ),
    (
        "ppo.gae",
        "returns without the values",
        "test_gae_returns_are_advantages_plus_values",
        "returns[b, t] = next_advantage + values[b, t]",
        "returns[b, t] = next_advantage",
    ),
    (
        "ppo.gae",
        "returns with the values after </s>",
        "test_gae_puts_nothing_after_eos",
        "advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)",
        "advantages, returns = torch.zeros_like(rewards), values.clone()",
    ),
    (
        "ppo.gae",
        "returns only the advantages",
        "test_gae_returns_advantages_and_returns_of_shape_b_t",
        "    return advantages, returns",
        "    return advantages",
    ),
    (
        "ppo.grpo_advantages",
        "ε under the square root, sqrt(var + ε)",
        "test_epsilon_is_added_to_the_std_not_under_the_root",
        "(x - mean) / (std + eps)",
        "(x - mean) / math.sqrt(std ** 2 + eps)",
    ),
    (
        "ppo.grpo_advantages",
        "one std over the whole batch",
        "test_grpo_std_is_the_groups_not_the_batchs",
        "std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))",
        "std = rewards.std().item()",
    ),
    (
        "ppo.grpo_advantages",
        "shifts the caller's rewards in place",
        "test_grpo_leaves_its_inputs_unchanged",
        "    advantages = torch.zeros_like(rewards)",
        "    rewards -= rewards.mean()\n    advantages = torch.zeros_like(rewards)",
    ),
    (
        "ppo.grpo_advantages",
        "one advantage per context",
        "test_grpo_gives_one_advantage_per_reply",
        "    return advantages",
        "    return advantages.view(-1, k).mean(1)",
    ),
    (
        "ppo.rloo_advantages",
        "shifts the caller's rewards in place",
        "test_rloo_leaves_its_inputs_unchanged",
        "    advantages = torch.zeros_like(rewards)",
        "    rewards -= rewards.mean()\n    advantages = torch.zeros_like(rewards)",
    ),
    (
        "ppo.rloo_advantages",
        "one advantage per context",
        "test_rloo_gives_one_advantage_per_reply",
        "    return advantages",
        "    return advantages.view(-1, k).mean(1)",
    ),
    (
        "ppo.rloo_advantages",
        "baseline divided by k, not k - 1",
        "test_rloo_baseline_leaves_the_reply_itself_out",
        "group[i] - others / (k - 1)",
        "group[i] - others / k",
    ),
    (
        "ppo.per_token_kl",
        "no gradient (computed on detached log-probs)",
        "test_kl_gradient_flows_to_the_policy_log_probs",
        "d = logprobs[b, t] - ref_logprobs[b, t]",
        "d = (logprobs[b, t] - ref_logprobs[b, t]).detach()",
    ),
    (
        "ppo.per_token_kl",
        "zeroes the padding of the caller's log-probs in place",
        "test_per_token_kl_leaves_its_inputs_unchanged",
        "    kl = torch.zeros_like(logprobs)",
        "    logprobs[mask == 0] = 0\n    kl = torch.zeros_like(logprobs)",
    ),
    (
        "ppo.per_token_kl",
        "k3 with the ratio inverted",
        "test_k3_estimator",
        "x = torch.exp(-d) - 1 + d",
        "x = torch.exp(d) - 1 - d",
    ),
    (
        "ppo.per_token_kl",
        "clamp to [0, 10] whatever kl_min and kl_max say",
        "test_kl_clamp_follows_kl_min_and_kl_max",
        "x = torch.clamp(x, min=kl_min, max=kl_max)",
        "x = torch.clamp(x, min=0.0, max=10.0)",
    ),
    (
        "ppo.kl_penalized_rewards",
        "zeroes the padding of the caller's log-probs in place",
        "test_kl_penalized_rewards_leave_their_inputs_unchanged",
        "    rewards = -kl_coef * per_token_kl(",
        "    logprobs.mul_(mask)\n    rewards = -kl_coef * per_token_kl(",
    ),
    (
        "ppo.kl_penalized_rewards",
        "the penalty's sign flipped",
        "test_every_real_token_pays_beta_times_kl",
        "rewards = -kl_coef * per_token_kl(",
        "rewards = kl_coef * per_token_kl(",
    ),
    (
        "ppo.kl_penalized_rewards",
        "the KL settings not passed on",
        "test_the_kl_settings_are_passed_on",
        "per_token_kl(logprobs, ref_logprobs, mask, kl_min, kl_max, estimator)",
        "per_token_kl(logprobs, ref_logprobs, mask)",
    ),
    (
        "ppo.kl_penalized_rewards",
        "the score also after </s>",
        "test_score_lands_on_the_last_real_token",
        "            rewards[b, real[-1]] += scores[b]",
        "            rewards[b, real[-1]:] += scores[b]",
    ),
    (
        "ppo.kl_penalized_rewards",
        "the penalty also after </s>",
        "test_rewards_are_0_after_eos",
        "per_token_kl(logprobs, ref_logprobs, mask, kl_min,",
        "per_token_kl(logprobs, ref_logprobs, mask * 0 + 1, kl_min,",
    ),
    (
        "reward.reward_from_logits",
        "shifts the caller's logits in place (a stable softmax on the input)",
        "test_reward_leaves_its_inputs_unchanged",
        "    rewards = []",
        "    logits -= logits.max(dim=-1, keepdim=True).values\n    rewards = []",
    ),
    (
        "reward.reward_from_logits",
        "one reward per mechanism",
        "test_reward_gives_one_number_per_reply",
        "rewards.append(torch.stack(probs).prod())",
        "rewards.append(torch.stack(probs))",
    ),
    (
        "ppo.value_loss",
        "min of the two errors, not max",
        "test_value_loss_clips_the_value_update",
        "torch.maximum(error, error_clip)",
        "torch.minimum(error, error_clip)",
    ),
    (
        "ppo.value_loss",
        "always the clipped error",
        "test_value_loss_takes_the_larger_error",
        "torch.maximum(error, error_clip)",
        "error_clip",
    ),
    (
        "ppo.policy_loss",
        "unclipped term detached outside the clip range",
        "test_gradient_on_the_clipped_and_unclipped_sides",
        "unclipped = -advantages[b, t] * ratio",
        "unclipped = -advantages[b, t] * (ratio if 1 - clip_range <= ratio <= 1 + clip_range else "
        "ratio.detach())",
    ),
    (
        "ppo.policy_loss",
        "ρ = exp(log π_old - log π) only in the statistics",
        "test_ratio_is_1_before_the_first_update",
        "ratios.append(ratio.detach())",
        "ratios.append(ratio.detach() + 1)",
    ),
    (
        "ppo.policy_loss",
        "clipped tokens still pushed",
        "test_clipped_tokens_get_no_gradient",
        "losses.append(torch.maximum(unclipped, clip))",
        "losses.append(torch.maximum(unclipped, clip.detach() + unclipped - unclipped.detach()))",
    ),
    (
        "ppo.policy_loss",
        "returns a per-token loss",
        "test_policy_loss_returns_a_scalar_loss_and_its_statistics",
        "    return mean(losses), {",
        "    return torch.stack(losses), {",
    ),
]


def mutant(exercise, correct, wrong):
    source = LOOPS[exercise]
    assert source.count(correct) == 1, (exercise, correct)
    return source.replace(correct, wrong)


def compile_function(exercise, source):
    """The function defined by source, with the module's names (torch, per_token_kl, ...) in
    scope."""
    module = {"ppo": ppo, "reward": reward}[exercise.split(".")[0]]
    namespace = dict(vars(module))
    exec(source, namespace)
    return namespace[exercise.split(".")[1]]


def failing_checks(exercise, function, monkeypatch):
    """Run every check of the exercise in this process with `function` in place of the module's;
    {check: error}."""
    module_name, name = exercise.split(".")
    monkeypatch.setattr({"ppo": ppo, "reward": reward}[module_name], name, function)
    checks = load(ROOT / lab.EXERCISES[exercise], f"lab_check_{name}")
    failures = {}
    for test_name, test in vars(checks).items():
        if test_name.startswith("test_") and callable(test):
            try:
                test()
            except Exception as e:
                failures[test_name] = f"{type(e).__name__}: {e}"
    return failures


AVAILABLE = lab.available_exercises(ROOT)  # ppo.grpo_advantages only where ppo.py has it


def reference_function(exercise):
    module, name = exercise.split(".")
    return getattr({"ppo": ppo, "reward": reward}[module], name)


@pytest.mark.parametrize("style", ["loops", "vector", "reference"])
@pytest.mark.parametrize("exercise", [e for e in LOOPS if e in AVAILABLE])
def test_correct_implementations_pass_every_check(exercise, style, monkeypatch):
    """Three correct implementations of each exercise pass all of its checks: Python loops, tensor
    code other than the reference's (VECTOR), and the repository's own function."""
    if style == "reference":
        function = reference_function(exercise)
    else:
        function = compile_function(exercise, {"loops": LOOPS, "vector": VECTOR}[style][exercise])
    assert failing_checks(exercise, function, monkeypatch) == {}


@pytest.mark.parametrize(
    "exercise, mistake, check, correct, wrong",
    [m for m in MUTANTS if m[0] in AVAILABLE],
    ids=[m[1] for m in MUTANTS if m[0] in AVAILABLE],
)
def test_each_usual_mistake_fails_the_check_that_names_it(
    exercise, mistake, check, correct, wrong, monkeypatch
):
    """GAE without λ or bootstrapping past </s>, an RLOO baseline with the reply itself, a KL of the
    wrong sign or unclamped, a ratio against the wrong log-probs, a value loss without its clip, ...
    each fail, on the check whose docstring says what is wrong."""
    failures = failing_checks(
        exercise, compile_function(exercise, mutant(exercise, correct, wrong)), monkeypatch
    )
    assert failures, f"{mistake}: every check passed"
    assert next(iter(failures)) == check, (
        f"{mistake}: the first check to fail is not {check}: {failures}"
    )


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
    "test_grpo_advantages_are_the_rewards_centred_and_scaled_per_context",
    "test_equal_rewards_give_zero_advantages_not_nan",  # the no-ε mutant names it
    # the unmasked mutants of policy_loss and value_loss name it
    "test_padding_is_ignored",
    "test_rloo_advantages_sum_to_zero_per_context",
    "test_reward_lies_in_0_1_and_is_1_for_certain_identifiers",
}


def test_every_check_is_the_first_to_fail_on_a_planted_mistake():
    """Each check of lab/checks (but the catch-all comparisons with the definition) is the first to
    fail on at least one mistake of MUTANTS, so its message is tested against the mistake that
    triggers it; the parametrized test above asserts that it does fail first."""
    checks = set()
    for exercise in AVAILABLE:
        module = load(ROOT / lab.EXERCISES[exercise], f"lab_check_list_{exercise.split('.')[1]}")
        checks |= {name for name in vars(module) if name.startswith("test_")}
    named = {m[2] for m in MUTANTS if m[0] in AVAILABLE}
    assert checks - named - CATCH_ALL == set(), "checks no planted mistake fails first"


def test_a_caller_passing_the_reference_log_probs_as_old_log_probs_is_told_so(monkeypatch):
    """policy_loss given the reference model's log-probs where the rollout policy's belong gives a
    detectably wrong loss, and the check says that is the ratio against the reference model."""
    checks = load(CHECKS / "test_policy_loss.py", "lab_check_policy_loss_ref")
    correct = ppo.policy_loss

    def policy_loss_fed_ref(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
        if old_logprobs.shape == checks.REF_LOGPROBS.shape and torch.equal(
            old_logprobs, checks.OLD_LOGPROBS
        ):
            old_logprobs = checks.REF_LOGPROBS  # what a caller that mixes up the two would pass
        return correct(logprobs, old_logprobs, advantages, mask, clip_range)

    monkeypatch.setattr(ppo, "policy_loss", policy_loss_fed_ref)
    with pytest.raises(AssertionError, match="ratio against the reference model's log-probs"):
        checks.test_ratio_is_against_the_rollout_policy_not_the_reference_model()


# ---------------------------------------------------------------------------------------- new


def test_blanking_keeps_signature_docstring_and_everything_else():
    """A blanked function keeps its signature and docstring (with its equations) and raises
    NotImplementedError naming the exercise; every other line of the file, comments included, stays.
    """
    source = (ROOT / "ppo.py").read_text(encoding="utf-8")
    blanked = lab.blank_function(source, "gae", "ppo.gae")
    node, original = lab.find_function(blanked, "gae"), lab.find_function(source, "gae")
    assert [a.arg for a in node.args.args] == [a.arg for a in original.args.args]
    assert (
        node.body[0].value.value == original.body[0].value.value
        and "δ_t" in node.body[0].value.value
    )
    assert len(node.body) == 2 and "lab exercise: implement ppo.gae" in blanked
    before, after = source.splitlines(), blanked.splitlines()
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


def test_a_blank_copy_fails_check_naming_each_blanked_function(tmp_path):
    """A copy with gae and reward_from_logits blanked: `check` prints FAIL for exactly those two,
    saying they are not implemented yet, and exits 1. The copy holds the repository's files and the
    checks, not runs or .git."""
    copy = new_copy(tmp_path / "student", "gae", "reward.reward_from_logits")
    assert json.loads((copy / ".lab.json").read_text()) == {
        "blanked": ["reward.reward_from_logits", "ppo.gae"]
    }
    for name in (
        "ppo.py",
        "train.py",
        "README.md",
        "requirements.txt",
        "tests/synthetic.py",
        "lab/lab.py",
        "lab/checks/test_gae.py",
    ):
        assert (copy / name).exists(), name
    assert not any((copy / name).exists() for name in (".venv", "runs", ".git"))
    p = check(copy, "--no-run")
    assert p.returncode == 1
    not_yet = "not implemented yet (it raises NotImplementedError)"
    assert verdicts(p.stdout) == {
        "reward.reward_from_logits": f"FAIL reward.reward_from_logits: {not_yet}",
        "ppo.gae": f"FAIL ppo.gae: {not_yet}",
    }


def test_the_unmodified_repository_passes_every_check(tmp_path):
    """A copy with nothing blanked: `check` checks every exercise, and every one passes (exit 0)."""
    p = check(new_copy(tmp_path / "student"), "--no-run")
    assert p.returncode == 0, p.stdout + p.stderr
    assert verdicts(p.stdout) == {e: f"PASS {e}" for e in lab.available_exercises(ROOT)}


def test_a_wrong_gae_and_a_wrong_rloo_baseline_fail_with_the_reason(tmp_path):
    """A student's GAE that ignores λ and an RLOO whose baseline is the mean of all k replies (the
    reply itself included), written into the copy's ppo.py: both FAIL, each with the check's words
    and the numbers that differ."""
    copy = new_copy(tmp_path / "student", "gae", "rloo_advantages")
    source = (copy / "ppo.py").read_text(encoding="utf-8")
    for exercise, _mistake, _, correct, wrong in MUTANTS[0], MUTANTS[2]:
        source = lab.replace_function(
            source, exercise.split(".")[1], mutant(exercise, correct, wrong)
        )
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


def test_the_copys_own_checks_are_not_used(tmp_path):
    """`check` grades with the grader's lab/checks: a copy whose lab/checks files are all emptied
    (or deleted) still fails a GAE without λ, with the grader's message."""
    copy = new_copy(tmp_path / "student", "gae")
    for path in (copy / "lab" / "checks").glob("*.py"):
        path.write_text("", encoding="utf-8")
    (copy / "lab" / "checks" / "conftest.py").write_text(
        "import pytest\npytest.skip('no checks', allow_module_level=True)\n", encoding="utf-8"
    )
    exercise, _, _, correct, wrong = MUTANTS[0]
    text = (copy / "ppo.py").read_text(encoding="utf-8")
    source = lab.replace_function(text, "gae", mutant(exercise, correct, wrong))
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


# the mistakes that used to pass, one per function, planted together in one student copy
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


def test_planted_mistakes_fail_in_a_copy_whose_checks_are_emptied(tmp_path):
    """A student copy with every exercise blanked, one planted mistake per function (the detached
    unclipped term, values.detach(), sqrt(var + ε), an in-place gae, ...), and its lab/checks
    emptied: `check` fails every function, each with the docstring of the grader's check that names
    the mistake."""
    copy = new_copy(tmp_path / "student", "all")
    for path in (copy / "lab" / "checks").glob("*.py"):
        path.write_text("", encoding="utf-8")
    docstrings = {}
    for exercise, mistake in PLANTED.items():
        if exercise not in AVAILABLE:
            continue
        _, _, check_name, correct, wrong = next(
            m for m in MUTANTS if m[0] == exercise and m[1] == mistake
        )
        path = copy / f"{exercise.split('.')[0]}.py"
        text = lab.replace_function(
            path.read_text(encoding="utf-8"),
            exercise.split(".")[1],
            mutant(exercise, correct, wrong),
        )
        path.write_text(text, encoding="utf-8")
        checks = load(ROOT / lab.EXERCISES[exercise], f"lab_check_doc_{exercise.split('.')[1]}")
        docstrings[exercise] = " ".join(getattr(checks, check_name).__doc__.split())
    for exercise in AVAILABLE:  # the blanked functions not planted above: the repository's own
        if exercise not in PLANTED:
            path = copy / f"{exercise.split('.')[0]}.py"
            text = lab.replace_function(
                path.read_text(encoding="utf-8"), exercise.split(".")[1], reference_source(exercise)
            )
            path.write_text(text, encoding="utf-8")
    p = check(copy, "--no-run")
    assert p.returncode == 1
    lines = verdicts(p.stdout)
    for exercise, doc in docstrings.items():
        assert lines[exercise].startswith(f"FAIL {exercise}: {doc} — "), lines[exercise]


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
