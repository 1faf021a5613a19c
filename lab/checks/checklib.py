"""What the lab checks share: random tensors, reply masks that end early, batches of the sizes
training uses, junk after </s>, the dtypes training feeds the functions, and comparisons whose
failure message says where the values differ and by how much, naming a cause only when a
diagnostic comparison confirms it.

The checks compare a function against its definition written out in float64 (usually with Python
loops, the slow obvious way), never against the repository's own code: any correct implementation
passes.

Messages. A check that fails says where the values differ, by how much, and what the definition
gives there. It names a cause (a mistake) only when the student's output equals what that mistake
gives, recomputed by the check (the definition with λ = 1, the baseline with the reply included,
...), or when the cause is observed directly (an argument changed, an output in the mask's dtype).
The words of each cause are in the CAUSES dict of its check file (and here, for the shared ones), so
that a test can show each firing on its own mistake and on no other.
"""

import torch

F64 = torch.float64

# The default batch: 5 rows of T = 7 tokens with reply lengths (real tokens, </s> included) that end
# early, a single token, one that fills the row and one with no real token at all. The checks mostly
# draw other sizes (draw_lengths); this one is where a function may first be compared.
LENGTHS = (4, 1, 7, 3, 0)
T = 7
# Training's sizes: the tiny preset samples replies of up to 12 tokens, the cpu preset up to 30, in
# batches of 8 and 32 rollouts (minibatches of 4 and 8).
MAX_T = 30
BATCH_SIZES = (3, 4, 6, 7, 8, 9)  # rows of a drawn batch: never the default 5

# The dtypes a check feeds beside float64, with a mask of each kind: emprl.reply_mask makes int64
# masks, a bool mask is what `mask.bool()` gives, and a float mask has the inputs' dtype.
DTYPES = (torch.float32, torch.bfloat16)
MASK_DTYPES = (torch.int64, torch.bool, None)  # None: the inputs' own dtype
# How close a function must come to the definition (computed in float64 from the same inputs) in
# each dtype: |got - want| <= rtol·|want| + atol·scale, with scale the largest |value| the
# definition gives in that comparison. float32 rounds at about 6e-8 relative, bfloat16 at 4e-3 (8
# bits of mantissa), and a sum of 30 terms, as GAE makes, adds up to 30 such roundings. Measured on
# these checks' data with the correct implementations of tests/test_lab.py: in float32 every one
# stays within a twentieth of its tolerance; in bfloat16 GAE, the largest, uses a third to a half
# of it, the others less; a mistake moves values by far more (a test plants two in bfloat16 only).
# Every check draws its sizes and values from fixed seeds: its verdict is the same on every run.
TOLERANCES = {
    torch.float64: (1e-5, 1e-6),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
}

# The causes named by the shared helpers below.
CAUSES = {
    "in_place": "a write into an argument (e.g. `x *= mask` or `x[...] = ...`): the caller still "
    "needs it; compute on a new tensor",
    "alias": "a conversion to the dtype a tensor already has (`.float()` of a float32 tensor, "
    "`.double()` of a float64 one, `.to(x.dtype)`) returns that same tensor, not a copy, so a "
    "write into the result is a write into the argument",
    "mask_dtype": "an output made from the mask (torch.zeros_like(mask), mask.clone(), ...) keeps "
    "the mask's dtype, and every value written into it is rounded to that dtype",
    "size": "the result depends on the size of the batch, which the definition's does not: a size "
    "written into the code?",
    "detached_stats": "is still attached to the autograd graph: return it detached (.detach() or "
    "under torch.no_grad()), else every minibatch's graph stays in memory",
    "no_gradient": "no gradient reaches it: the loss is not a function of it in autograd (computed "
    "on .detach()ed tensors, under torch.no_grad(), or through .item()?)",
}


def rand(shape, seed, scale=1.0, shift=0.0):
    """shift + scale · N(0, 1), float64, reproducible."""
    return shift + scale * torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=F64
    )


def draw_lengths(seed, max_T=MAX_T):
    """(lengths, T) of a batch drawn from seed: T from 8 to max_T tokens, B from BATCH_SIZES rows,
    among them a row with no real token, one with a single token and one that fills the row, the
    others of random lengths; in random order."""
    generator = torch.Generator().manual_seed(seed)
    T = int(torch.randint(8, max_T + 1, (1,), generator=generator))
    B = BATCH_SIZES[int(torch.randint(len(BATCH_SIZES), (1,), generator=generator))]
    others = torch.randint(2, T, (B - 3,), generator=generator).tolist()
    lengths = [0, 1, T] + others
    order = torch.randperm(B, generator=generator).tolist()
    return tuple(lengths[i] for i in order), T


def prefix_mask(lengths=LENGTHS, T=T):
    """(B, T) float64 reply mask: 1 on the first n tokens of a row (the reply up to and including
    </s>), 0 after."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(F64)


def junk_after_eos(x, mask, seed, scale=10.0, shift=50.0):
    """x with large random numbers where the mask is 0: a correct function never lets them
    through."""
    return torch.where(mask.bool(), x, rand(x.shape, seed, scale=scale, shift=shift))


def tensor(got, what):
    """got as a detached float64 tensor; a function that returns something else fails here, with its
    name."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what} should be a torch tensor, got {type(got).__name__}")
    return got.detach().to(F64)


def close(got, want, rtol=1e-5, atol=1e-6):
    """Whether got equals want (float64 tensors of one shape) everywhere within the tolerance."""
    got = torch.as_tensor(got, dtype=F64)
    want = torch.as_tensor(want, dtype=F64)
    return got.shape == want.shape and bool(torch.isclose(got, want, rtol=rtol, atol=atol).all())


def where_it_differs(got, want, what, rtol, atol, expected):
    """The words for the first element of got that differs from want: "advantages: at [0, 3] it is
    1.23, the definition gives 0.567 (+0.663; 4 of 35 values differ)"."""
    wrong = ~torch.isclose(got, want, rtol=rtol, atol=atol)  # nan is never close
    index = tuple(int(i) for i in wrong.nonzero()[0])
    a = got[index].item()
    b = want[index].item()
    numbers = f"{a:.6g}, {expected} {b:.6g}"
    if not index:  # a single number
        return f"{what} is {numbers} ({a - b:+.3g})"
    count = f"{int(wrong.sum())} of {wrong.numel()} values differ"
    return f"{what}: at [{', '.join(map(str, index))}] it is {numbers} ({a - b:+.3g}; {count})"


def assert_close(
    got,
    want,
    what,
    rtol=1e-5,
    atol=1e-6,
    expected="the definition gives",
    causes=(),
    definition="",
):
    """got equals want (float64 tensors of the same shape) element by element, within float32
    rounding.

    Else an AssertionError in words: "advantages: at [0, 3] it is 1.234, the definition gives 0.567
    (+0.667; 2 of 35 values differ)" (`expected` says where want comes from), then the first of
    `causes`, pairs (words, what that mistake gives), whose values got equals: a cause is named
    only when the output is what it gives, and no other cause gives the same; else `definition` (the
    formula to compare against)."""
    got = tensor(got, what)
    want = torch.as_tensor(want, dtype=F64)
    if got.shape != want.shape:
        raise AssertionError(
            f"{what} has shape {tuple(got.shape)}, the definition has shape {tuple(want.shape)}"
        )
    if close(got, want, rtol, atol):
        return
    message = where_it_differs(got, want, what, rtol, atol, expected)
    named = {
        words
        for words, alternative in causes
        if close(got, torch.as_tensor(alternative, dtype=F64), rtol, atol)
    }
    if len(named) == 1:  # two mistakes that give the same numbers here confirm neither
        raise AssertionError(f"{message}: {named.pop()}")
    raise AssertionError(f"{message}; the definition: {definition}" if definition else message)


def masked_mean(x, mask):
    """mean over the real tokens, Σ x·m / Σ m, written out (float64)."""
    return (x * mask).sum() / mask.sum()


def convert(x, dtype, mask_dtype=None, is_mask=False):
    """A copy of a float64 argument in a check's dtype: a mask in mask_dtype (the inputs' dtype when
    None), any other floating tensor in dtype; integer tensors and everything else as they are."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return x
    return x.to(mask_dtype or dtype if is_mask else dtype, copy=True)


def changed_arguments(function, names, args, kwargs, condition):
    """The names of the tensor arguments that function(*args, **kwargs) changed in place; an
    AssertionError naming the condition (words) if the call raises."""
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else None for a in args]
    try:
        function(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise AssertionError(f"with {condition} the call raises {type(e).__name__}: {first}") from e
    return [
        name
        for name, arg, copy in zip(names, args, before)
        if copy is not None and not torch.equal(arg.detach(), copy)
    ]


def call_keeping_inputs(function, what, *args, **kwargs):
    """function(*args, **kwargs) with its float64 arguments, and again in every dtype of DTYPES with
    every kind of mask (an argument named "mask" is the mask); an AssertionError naming the first
    tensor argument a call changed in place, and in which dtypes (`what` names the arguments in
    order: "rewards, values, mask"). A change in some dtypes only (say float32, where `.float()`
    returns the argument itself) is told as such."""
    names = [name.strip() for name in what.split(",")]
    masks = MASK_DTYPES if "mask" in names else (None,)
    conditions = [(F64, None)] + [(d, m) for d in DTYPES for m in masks]
    changed = {}  # argument -> the conditions under which the call changed it
    for dtype, mask_dtype in conditions:
        converted = [
            convert(a, dtype, mask_dtype, is_mask=(names[i : i + 1] == ["mask"]))
            for i, a in enumerate(args)
        ]
        condition = describe(dtype, (mask_dtype or dtype) if "mask" in names else None)
        for name in changed_arguments(function, names, converted, kwargs, condition):
            changed.setdefault(name, []).append((dtype, mask_dtype))
    if not changed:
        return
    name, where = next(iter(changed.items()))
    dtypes = sorted({str(d).replace("torch.", "") for d, _ in where})
    kept = sorted({str(d).replace("torch.", "") for d, _ in conditions} - set(dtypes))
    if kept:  # some dtypes only: confirmed by the dtypes in which the argument was kept
        raise AssertionError(
            f"the call changed its argument {name} in place with {' and '.join(dtypes)} inputs, "
            f"not with {' or '.join(kept)} inputs: {CAUSES['alias']}"
        )
    raise AssertionError(
        f"the call changed its argument {name} in place, in every dtype: {CAUSES['in_place']}"
    )


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def assert_dtype(got, what, dtype, mask_dtype=None):
    """got (a tensor) is in dtype or float32, as the docstrings ask of an output; else an
    AssertionError that names the mask's dtype when the output has it."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what} should be a torch tensor, got {type(got).__name__}")
    if got.dtype in (dtype, torch.float32):
        return
    inputs = f"with {describe(dtype, mask_dtype)}"
    if mask_dtype is not None and got.dtype == mask_dtype and not mask_dtype.is_floating_point:
        raise AssertionError(
            f"{inputs}, {what} come out in {dtype_name(got.dtype)}, the mask's dtype: "
            f"{CAUSES['mask_dtype']}"
        )
    allowed = sorted({dtype_name(dtype), "float32"})
    raise AssertionError(
        f"{inputs}, {what} come out in {dtype_name(got.dtype)}: the docstrings ask for "
        f"{' or '.join(allowed)} (the inputs' dtype, or float32 where a function computes in "
        "float32)"
    )


def conditions(seed):
    """The training conditions of a dtype check: (dtype, mask_dtype, lengths, T) for every dtype of
    DTYPES and every kind of mask, each with a batch of its own drawn from seed."""
    out = []
    for i, (dtype, mask_dtype) in enumerate((d, m) for d in DTYPES for m in MASK_DTYPES):
        lengths, T = draw_lengths(seed + i)
        out.append((dtype, mask_dtype or dtype, lengths, T))
    return out


def tolerance(dtype, want, scale=None):
    """(rtol, atol) of a comparison in dtype: TOLERANCES, atol scaled by the largest |value| of
    want (1 where want is all 0), or by `scale` where the definition subtracts terms larger than its
    result (approx_kl_k3 = (ρ - 1) - log ρ)."""
    rtol, atol = TOLERANCES[dtype]
    if scale is None:
        scale = float(torch.as_tensor(want, dtype=F64).abs().max())
    return rtol, atol * (scale or 1.0)


def describe(dtype, mask_dtype=None, lengths=None, T=None):
    """Words for a check's condition: "float32 inputs, an int64 mask, 6 rows of 12 tokens"."""
    words = [f"{dtype_name(dtype)} inputs"]
    if mask_dtype is not None:
        article = "an" if dtype_name(mask_dtype)[0] in "aeiou" else "a"
        words.append(f"{article} {dtype_name(mask_dtype)} mask")
    if lengths is not None:
        words.append(f"{len(lengths)} rows of {T} tokens")
    return ", ".join(words)


def rows_of_tokens(lengths, T):
    """Words for a batch's size: "6 rows of 12 tokens"."""
    return f"{len(lengths)} rows of {T} tokens"


def assert_any_size(compute, what, seed, sizes=rows_of_tokens):
    """compute(lengths, T) -> (got, want): the function's output and the definition's on a batch
    of those sizes. At the default batch (LENGTHS, T = 7) first: where it already differs there this
    check says nothing (the other checks tell what); else batches of other sizes (drawn from seed:
    B from BATCH_SIZES, T up to MAX_T) must agree too, and a difference or an error there is a size
    written into the code. sizes(lengths, T) puts a size in words."""
    try:
        got, want = compute(LENGTHS, T)
    except Exception:  # the other checks tell what is wrong at the default size
        return
    if not isinstance(got, torch.Tensor) or not close(tensor(got, what), want):
        return
    default = f"with {sizes(LENGTHS, T)} it agrees with the definition"
    for i in range(3):
        lengths, t = draw_lengths(seed + i)
        drawn = f"with {sizes(lengths, t)}"
        try:
            got, want = compute(lengths, t)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise AssertionError(
                f"{drawn} the call raises {type(e).__name__}: {first}; {default}: {CAUSES['size']}"
            ) from None
        got = tensor(got, what)
        if got.shape != want.shape:
            raise AssertionError(
                f"{drawn} {what} has shape {tuple(got.shape)}, the definition "
                f"{tuple(want.shape)}; {default}: {CAUSES['size']}"
            )
        if not close(got, want):
            message = where_it_differs(
                got, want, f"{what} {drawn}", 1e-5, 1e-6, "the definition gives"
            )
            raise AssertionError(f"{message}; {default}: {CAUSES['size']}")


def assert_detached(stats, what="stats"):
    """Every value of the dict stats is a tensor with no graph attached (requires_grad False)."""
    for name, value in stats.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise AssertionError(f"{what}['{name}'] {CAUSES['detached_stats']}")


def gradient(loss, x, what):
    """d loss / d x as a float64 tensor; an AssertionError in words when no gradient reaches x."""
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise AssertionError(f"{what}: {CAUSES['no_gradient']}")
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        raise AssertionError(f"{what}: {CAUSES['no_gradient']}")
    return grad.detach().to(F64)
