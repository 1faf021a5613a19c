"""What the lab checks share: random float64 tensors, reply masks that end early, junk after </s>,
and a comparison whose failure message names the first element that differs and what the definition
gives there.

The checks compare a function against its definition written out in float64 (usually with Python
loops, the slow obvious way), never against the repository's own code: any correct implementation
passes."""

import torch

F64 = torch.float64

# reply lengths (real tokens, </s> included) of the rows of a batch of T = 7 tokens: rows that end
# early, one with a single token, one that fills the row, and one with no real token at all
LENGTHS = (4, 1, 7, 3, 0)
T = 7


def rand(shape, seed, scale=1.0, shift=0.0):
    """shift + scale · N(0, 1), float64, reproducible."""
    return shift + scale * torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=F64
    )


def prefix_mask(lengths=LENGTHS, T=T):
    """(B, T) float64 reply mask: 1 on the first n tokens of a row (the reply up to and including
    </s>), 0 after."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


def junk_after_eos(x, mask, seed):
    """x with large random numbers where the mask is 0: a correct function never lets them
    through."""
    return torch.where(mask.bool(), x, rand(x.shape, seed, scale=10.0, shift=50.0))


def tensor(got, what):
    """got as a detached float64 tensor; a function that returns something else fails here, with its
    name."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what} should be a torch tensor, got {type(got).__name__}")
    return got.detach().to(F64)


def assert_close(got, want, what, rtol=1e-5, atol=1e-6, expected="the definition gives"):
    """got equals want (float64 tensors of the same shape) element by element, within float32
    rounding.

    Else an AssertionError in words: "advantages: at [0, 3] it is 1.234, the definition gives 0.567"
    (`expected` says where want comes from)."""
    got, want = tensor(got, what), torch.as_tensor(want, dtype=F64)
    if got.shape != want.shape:
        raise AssertionError(
            f"{what} has shape {tuple(got.shape)}, the definition has shape {tuple(want.shape)}"
        )
    wrong = ~torch.isclose(got, want, rtol=rtol, atol=atol)  # nan is never close
    if wrong.any():
        index = tuple(int(i) for i in wrong.nonzero()[0])
        numbers = f"{got[index].item():.6g}, {expected} {want[index].item():.6g}"
        if not index:  # a single number
            raise AssertionError(f"{what} is {numbers}")
        raise AssertionError(f"{what}: at [{', '.join(map(str, index))}] it is {numbers}")


def masked_mean(x, mask):
    """mean over the real tokens, Σ x·m / Σ m, written out (float64)."""
    return (x * mask).sum() / mask.sum()


def call_keeping_inputs(function, what, *args, **kwargs):
    """function(*args, **kwargs), then an AssertionError naming the first tensor argument the call
    changed in place (`what` names the arguments in order: "rewards, values, mask")."""
    names = [name.strip() for name in what.split(",")]
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    out = function(*args, **kwargs)
    for name, arg, copy in zip(names, args, before):
        if copy is not None and not torch.equal(arg.detach(), copy):
            raise AssertionError(
                f"the call changed its argument {name} in place (e.g. `{name} *= "
                "mask` or "
                f"`{name}[...] = ...`): the caller still needs it; compute on a "
                "new tensor"
            )
    return out


def assert_detached(stats, what="stats"):
    """Every value of the dict stats is a tensor with no graph attached (requires_grad False)."""
    for name, value in stats.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise AssertionError(
                f"{what}['{name}'] is still attached to the autograd graph: "
                "return it detached "
                "(.detach() or under torch.no_grad()), else every minibatch's "
                "graph stays in memory"
            )


def gradient(loss, x, what):
    """d loss / d x as a float64 tensor; an AssertionError in words when no gradient reaches x."""
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise AssertionError(
            f"no gradient reaches {what}: the loss is not a function of it in "
            "autograd (computed "
            f"on .detach()ed tensors, under torch.no_grad(), or through .item()?)"
        )
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        raise AssertionError(
            f"no gradient reaches {what}: the loss does not depend on it in autograd (detached?)"
        )
    return grad.detach().to(F64)
